# The two commands (see README.md):
#   make run    set up and run the gateway with embedded defaults
#   make test   set up and run the whole test suite (what CI runs)
.PHONY: run test setup check policies bench clean

setup:
	scripts/bootstrap

run: setup
	scripts/run

test: setup
	scripts/check

check:
	scripts/check

policies:
	scripts/check-policies

bench: setup
	.venv/bin/python -m bench.pipeline

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache *.egg-info
