#!/bin/bash
# issue 15 item 4: old (main at 6634ebf) vs new (main) interleaved on a quiet machine
cd /tmp
T8=/tmp/streammerge-bench/inputs/qwen2.5-7b-12L-bf16-s0
SP=/tmp/streammerge-bench/sparse/llama3-70b-4L
run() { # label pythonpath args...
  local v=$1 P=$2; shift 2
  rm -rf /tmp/cmp-out
  s=$(date +%s.%N)
  PYTHONPATH=$P python -m streammerge merge "$@" -o /tmp/cmp-out --json --quiet --chunk-size 16MiB > /tmp/cmp4-$v.json
  e=$(date +%s.%N)
  echo "$v wall $(echo "$e - $s" | bc) $(python3 -c "import json,os; d=json.load(open('/tmp/cmp4-$v.json')); print('in-process', round(d['seconds'],2), 'GB/s', round(d['gbps'],3), 'rss', d['peak_rss_anon'], 'load', round(os.getloadavg()[0],2), list(d['shard_sha256'].values())[:1])")"
}
for r in 1 2; do
  for v in new old; do
    if [ $v = old ]; then P=/tmp/old; else P=/work/main; fi
    run sparse-$v-$r $P $SP/target $SP/sft $SP/grpo --sink null-sha256
  done
done
for v in new old; do
  if [ $v = old ]; then P=/tmp/old; else P=/work/main; fi
  run 8gb-$v $P $T8/target $T8/sft $T8/grpo
done
rm -rf /tmp/cmp-out
