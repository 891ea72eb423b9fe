# Two commands do all set-up on a fresh clone (CPU, no GPU, no Hub access):
#   make demo   -> creates .venv, installs trl-infalign, runs the offline quickstart (examples/quickstart.py)
#   make test   -> creates .venv, installs trl-infalign[dev,deepspeed], runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; pip takes it from the local wheel cache when the machine has one.
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,deepspeed]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python examples/quickstart.py --output outputs/quickstart

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
