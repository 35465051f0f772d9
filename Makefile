.PHONY: demo test install lint bench chart-schema

# The two commands of the README: each sets up what it needs (.ci/setup skips what is there).
demo:
	.ci/setup demo
	.venv/bin/saige-k8s run -f jobs/demo.yaml

test:
	.ci/setup test
	.ci/test

install:
	.ci/setup test

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports && .venv/bin/mypy

bench:
	.venv/bin/python tests/benchmarks/bench_extract.py --rows 1000000

chart-schema:
	.venv/bin/python helm/values_schema.py
