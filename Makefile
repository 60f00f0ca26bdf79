# Two commands do all set-up on a fresh machine:
#   make demo   # venv + install + `tessera demo` (synthetic 4096^2 scene, bundled U-Net, local Ray)
#   make test   # venv + install + the test suite (CPU, real local Ray)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-slow bench clean

$(BIN)/tessera: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/tessera

demo: install
	$(BIN)/tessera demo

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

clean:
	rm -rf tessera-demo .pytest_cache .hypothesis
