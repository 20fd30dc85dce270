#!/bin/bash
# issue 3 targets: HTTP vs offline on the same prompts; shared-prefix TTFT with/without prefix caching
cd /work/main
T=.venv/bin/tuneserve
export TUNESERVE_QUIET=1
wait_up() { for i in $(seq 1 120); do curl -sf http://127.0.0.1:8011/health >/dev/null && return 0; sleep 1; done; return 1; }
echo "== offline"; $T bench offline smollm2-135m --json results/offline.json
$T serve smollm2-135m --port 8011 > results/server1.log 2>&1 & S=$!; wait_up
echo "== serve corpus saturation"; $T bench serve --base-url http://127.0.0.1:8011 --dataset corpus --max-concurrency 64 --tokenizer smollm2-135m --json results/serve.json
echo "== shared prefix, caching on"; $T bench serve --base-url http://127.0.0.1:8011 --dataset shared-prefix --num-prompts 32 --prefix-len 1024 --suffix-len 32 --output-len 32 --max-concurrency 4 --tokenizer smollm2-135m --json results/prefix_on.json
kill -TERM $S; wait $S
$T serve smollm2-135m --port 8011 --no-enable-prefix-caching > results/server2.log 2>&1 & S=$!; wait_up
echo "== shared prefix, caching off"; $T bench serve --base-url http://127.0.0.1:8011 --dataset shared-prefix --num-prompts 32 --prefix-len 1024 --suffix-len 32 --output-len 32 --max-concurrency 4 --tokenizer smollm2-135m --json results/prefix_off.json
kill -TERM $S; wait $S
