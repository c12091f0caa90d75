# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.serve-installed
TINY := tests/fixtures/models/tiny-sd
HOST ?= 127.0.0.1
PORT ?= 7860

S_CLI := deploy/node_modules/.bin/s

.PHONY: serve test install tiny-model bench load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,export,test]'
	$(BIN)/pip install -q --no-deps k-diffusion==0.0.16
	touch $(STAMP)

# Serving needs only the lean runtime (no torch): a quick install for `make serve` on a fresh machine.
$(SERVE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu]'
	touch $(SERVE_STAMP)

install: $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/sdfc serve --host $(HOST) --port $(PORT)

# The Serverless Devs CLI renders s.yaml offline in the deploy tests (pinned in deploy/package-lock.json).
$(S_CLI): deploy/package.json deploy/package-lock.json
	npm ci --prefix deploy --no-audit --no-fund --loglevel=error
	touch $(S_CLI)

test: $(STAMP) $(S_CLI)
	$(BIN)/python -m pytest -q --durations=20

# Rebuild the committed tiny test model from its fixed seed (needs the export extra).
tiny-model: $(STAMP)
	$(BIN)/sdfc export tiny --out $(TINY) --tokenizer-from $(TINY)/tokenizer --no-validate

bench: $(STAMP)
	$(BIN)/sdfc bench

# Loopback load test of `sdfc serve` on the tiny model (8 clients x 60 s; see bench/load.py).
load: $(STAMP)
	$(BIN)/sdfc bench load

clean:
	rm -rf $(VENV) build *.egg-info
