# Two commands do all set-up on a fresh machine:
#   make demo   # venv + install + `tessera demo` (synthetic 4096^2 scene, bundled U-Net, local Ray)
#   make test   # venv + install + the test suite (CPU, real local Ray)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser demo test test-slow bench clean

$(BIN)/tessera: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/tessera

demo: install
	$(BIN)/tessera demo

# Debian's Chromium and ChromeDriver for the report's browser test, where we are root with apt;
# without them that one test skips (and says why)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    timeout 300 apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "no Chromium/ChromeDriver: the report's headless-browser test will skip"

test: install browser
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

clean:
	rm -rf tessera-demo .pytest_cache .hypothesis
