.PHONY: install test lint bench demo

install:
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"

test:
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports

bench:
	.venv/bin/python tests/benchmarks/bench_extract.py --rows 1000000

demo:
	.venv/bin/saige-k8s demo-db --out saige.db --rows 5000 && .venv/bin/saige-k8s extract -f jobs/demo.yaml
