# Shortcuts; the README's two commands need nothing but Python 3.11 and pip.
PY ?= .venv/bin/python
PORT ?= 3000

.PHONY: venv serve test export
venv:
	python3.11 -m venv .venv && .venv/bin/pip install -q -e ".[serve,train,dev]"

serve:
	.venv/bin/bentoml serve service.service:SyntheticImages --host 127.0.0.1 --port $(PORT)

test:
	bash .ci/run

export:
	$(PY) -m training.export $(RUNS)
