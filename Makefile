# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/acqd demo --config configs/rig.yaml --data-root demo-data --seconds 20
	@echo "acqd is installed in $(VENV)/, not on PATH: '. $(VENV)/bin/activate' (or $(BIN)/acqd) to run it yourself"

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 4 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python scripts/bench

clean:  # finalized sessions are immutable (chattr +i): unseal before deleting
	-chattr -R -i demo-data bench-data 2>/dev/null
	rm -rf $(VENV) demo-data bench-data
