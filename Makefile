# The two commands (see README.md):
#   make run    set up and run the gateway with embedded defaults
#   make test   set up and run the whole test suite (what CI runs)
.PHONY: run test setup check policies bundle bench clean

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

# The signed OPA bundle (.run/bundle.tar.gz; a throwaway dev key unless
# BUNDLE_SIGNING_KEY names the operator's).
bundle:
	scripts/build-bundle

# The whole benchmark in one run (bench/RESULTS.md); e.g. make bench BENCH_ARGS=--quick
bench: setup
	.venv/bin/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache *.egg-info
