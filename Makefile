# Two entry points for a fresh machine, each creating its own virtual environment:
#   make demo   trains the learned and the frozen patch-projection arm on the bundled digits
#               and writes their comparison report to runs/demo/report/report.html
#   make test   runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned here to a pair known to work together; setup.cfg accepts
# any recent pair.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: demo test install clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e '.[test]'

demo: install
	$(BIN)/stabilitylab run --out $(DEMO_DIR)/learned --overwrite
	$(BIN)/stabilitylab run --out $(DEMO_DIR)/frozen --freeze-patch-embed --overwrite
	$(BIN)/stabilitylab report $(DEMO_DIR)/learned $(DEMO_DIR)/frozen --out $(DEMO_DIR)/report

test: install
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(DEMO_DIR)
