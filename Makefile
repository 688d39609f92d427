# Everything a newcomer needs: `make demo` (the main job end to end) and `make test`.
# Each target creates .venv and installs on first use. CPU machines pin torch through
# constraints-cpu.txt so that nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip -q --disable-pip-version-check

.PHONY: install demo test bench clean
install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evomerge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache runs
