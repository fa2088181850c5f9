# The commands people type. `just --list` shows them.

# Start the server on the built-in voice (or: just serve --model pretrained_models/CosyVoice2-0.5B)
serve *ARGS:
    uv run --extra voice rtserver serve {{ARGS}}

# The same server in N replicas on Ray Serve (docs/deploy.md): just cluster 2 [--model ...]
cluster REPLICAS *ARGS:
    uv run --extra voice --extra cluster rtserver serve --replicas {{REPLICAS}} {{ARGS}}

# The whole test suite (installs Chromium for the browser test if missing)
test *ARGS:
    command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
    uv run --extra voice --extra cluster pytest {{ARGS}}

# Benchmarks; results go to docs/benchmarks.md
bench:
    uv run --extra voice python bench/http_load.py
    uv run --extra voice python bench/ws_agents.py
    uv run --extra voice --extra cluster python bench/serve_proxy.py

# Format and lint
lint:
    uv run ruff format .
    uv run ruff check . --fix

# Open the browser demo
demo:
    uv run --extra voice rtserver serve --host 127.0.0.1 --port 50000

# The GPU benchmark (one GPU, ~8 minutes): parity on CUDA, TTFA and real-time capacity in
# float32 and bfloat16, written to docs/benchmarks.md
bench-gpu *ARGS:
    uv run --extra voice python bench/bench_gpu.py {{ARGS}}
