"""The summary: the figures the issue's targets are judged on, and the short table printed at the end of a run."""

from __future__ import annotations


def fmt_gbps(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def summarize(results: dict) -> tuple[dict, list[str]]:
    """The figures the issue's targets are judged on, and the short table printed last."""
    st = results["steps"]
    s: dict = {}
    rows: list[str] = []
    env = st.get("env", {})
    card = (env.get("device_properties") or {}).get("name") or (env.get("gpu") or {}).get("why", "?")
    rows.append(f"card: {card}; size: {results['size']}; total {results.get('total_s', 0):.0f} s")
    hr = env.get("host_register")
    if hr:
        rows.append(f"cudaHostRegister supported: {hr.get('supported')}, ReadOnly: {hr.get('read_only_supported')}")
    py = st.get("pytest", {})
    rows.append(f"pytest -m cuda: {py.get('summary') or py.get('error', 'not run')}")
    gen = st.get("generate", {})
    if "bytes_in" in gen:
        rows.append(
            f"trio: {gen['layout']} x {gen['num_layers']} layers, {gen['bytes_in'] / 1e9:.2f} GB in, "
            f"{gen['bytes_out'] / 1e9:.2f} GB out, generated in {gen.get('generation_s') or 0:.1f} s"
        )
    pipe = st.get("pipeline", {}).get("runs", {})
    if pipe:
        rows.append(
            "pipeline -> null sink              GB/s moved  wall s  equal  peak GPU MB   h2d/kern/d2h busy s  overlap"
        )
        for name, r in pipe.items():
            if "error" in r:
                rows.append(f"  {name:32s} ERROR {r['error'][:80]}")
                continue
            ss = r.get("stage_seconds", {})
            busy = "/".join(f"{ss[k]:.2f}" for k in ("gpu_h2d", "gpu_kernel", "gpu_d2h") if k in ss) or "-"
            rows.append(
                f"  {name:32s} {r['gbps_moved']:9.1f}  {r['wall_s']:6.2f}  {str(r.get('bytes_equal_cpu', '-')):5s}"
                f"  {r.get('peak_gpu_memory', 0) / 2**20:10.0f}   {busy:19s}  {ss.get('gpu_overlap', 0):.2f}"
                + ("  (registration refused: staged)" if any("refused" in w for w in r.get("warnings", [])) else "")
            )
        cuda_runs = [r for k, r in pipe.items() if k.startswith("cuda") and "gbps_moved" in r]
        best = max(cuda_runs, default=None, key=lambda r: r["gbps_moved"])
        if best:
            s["pipeline_best_gbps"] = best["gbps_moved"]
            s["pipeline_target_40gbps_met"] = best["gbps_moved"] >= 40
        if "cpu" in pipe and best and "gbps_moved" in pipe["cpu"]:
            s["pipeline_cuda_over_cpu"] = best["gbps_moved"] / pipe["cpu"]["gbps_moved"]
    e2e = st.get("e2e", {})
    if "floor" in e2e:
        floor = e2e["floor"]["seconds"]
        s["floor_s"] = floor
        line = f"end to end to disk: floor {floor:.2f} s"
        for name in ("cpu", "cuda"):
            r = e2e.get(name, {})
            if "wall_s" in r:
                s[f"e2e_{name}_s"] = r["wall_s"]
                s[f"e2e_{name}_over_floor"] = r["wall_s"] / floor
                line += f"; {name} {r['wall_s']:.2f} s ({r['wall_s'] / floor:.2f}x floor)"
            elif r:
                line += f"; {name} {r.get('error') or r.get('skipped')}"
        if "bytes_equal" in e2e:
            s["e2e_bytes_equal"] = e2e["bytes_equal"]
            line += f"; files equal: {e2e['bytes_equal']}"
        rows.append(line)
    sw = st.get("sweep", {})
    if "sweep" in sw:
        single_s = sum(r.get("wall_s", 0) for r in sw["single"].values())
        s["sweep_speedup"] = sw.get("speedup")
        s["sweep_bytes_equal"] = sw.get("bytes_equal")
        s["combine_bytes_equal"] = sw.get("combine_bytes_equal")
        rows.append(
            f"sweep {sw['alphas']} -> null: {sw['sweep']['wall_s']:.2f} s vs {single_s:.2f} s single "
            f"({sw.get('speedup') or 0:.2f}x), equal: {sw.get('bytes_equal')}; combine 2 vectors cuda "
            f"{sw.get('combine_gpu_s', 0):.2f} s / cpu {sw.get('combine_cpu_s', 0):.2f} s, equal: "
            f"{sw.get('combine_bytes_equal')}"
        )
    elif sw:
        rows.append(f"sweep: {sw.get('error') or sw.get('note')}")
    ker = st.get("kernel", {})
    if "skipped" in ker or "error" in ker:
        rows.append(f"kernel: {ker.get('skipped') or ker.get('error')}")
    for name, c in (ker.get("cases") or {}).items():
        s.setdefault("kernel_vs_copy", {})[name] = c["kernel_vs_copy"]
        rows.append(
            f"kernel {name}: {c['kernel_gbps']:.0f} GB/s vs device copy {c['copy_gbps']:.0f} GB/s "
            f"({100 * c['kernel_vs_copy']:.0f}%)"
        )
    tr = ker.get("transfers") or {}
    if tr:
        rows.append(
            "transfers GB/s: pinned H2D "
            + ", ".join(
                f"{k.replace('_gbps', '')} {fmt_gbps(tr.get(k))}"
                for k in ("pinned_h2d_gbps", "pinned_d2h_gbps", "registered_h2d_gbps", "pageable_h2d_gbps")
            )
            + f"; register {tr.get('register_bytes', 0) / 2**30:.2f} GiB in {tr.get('register_1_thread_s', 0):.3f} s"
            + f" (4 threads {tr.get('register_4_threads_s', float('nan')):.3f} s)"
        )
    sp = st.get("sparse70b", {}).get("run")
    if sp:
        s["sparse70b_peak_gpu_memory"] = sp["peak_gpu_memory"]
        rows.append(
            f"sparse {st['sparse70b']['layout']} x {st['sparse70b']['num_layers']}: peak GPU "
            f"{sp['peak_gpu_memory'] / 2**20:.0f} MiB, {sp['gbps_moved']:.1f} GB/s moved"
        )
    mk = st.get("mergekit", {})
    if "wall_s" in mk:
        s["mergekit_cuda_s"] = mk["wall_s"]
        if "e2e_cuda_s" in s:
            s["cuda_speedup_over_mergekit"] = mk["wall_s"] / s["e2e_cuda_s"]
        rows.append(f"mergekit --cuda: {mk['wall_s']:.1f} s (rc {mk.get('returncode')})")
    elif mk:
        rows.append(f"mergekit: {mk.get('skipped') or mk.get('error')}")
    failed = [k for k, v in st.items() if isinstance(v, dict) and "error" in v]
    s["failed_steps"] = failed
    rows.append(f"failed steps: {', '.join(failed) if failed else 'none'}")
    return s, rows
