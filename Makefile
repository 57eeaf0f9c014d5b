# Shortcuts; the README's two commands need nothing but Python 3.11 and pip.
PY ?= .venv/bin/python
PORT ?= 3000

.PHONY: venv serve test export
venv:
	python3.11 -m venv .venv && .venv/bin/pip install -q -e ".[serve,train,dev]"

serve:
	BENTOML_DO_NOT_TRACK=true .venv/bin/bentoml serve service.service:SyntheticImages --host 127.0.0.1 --port $(PORT)

test:
	bash .ci/run

export:  # make export RUNS=runs/mnist/cdcgan (a training run folder, or several)
	@test -n "$(RUNS)" || { echo "make export: give RUNS=<run folder>, e.g. RUNS=runs/mnist/cdcgan" >&2; exit 2; }
	$(PY) -m training.export $(RUNS)

# Container image of the service (scripts/container.sh; needs a Docker engine: `make docker-engine`).
# BASE=auto|default|local|<image>: BentoML's python:3.11-slim base, or a local Debian one when Docker Hub is out of reach.
BASE ?= auto
.PHONY: container container-run container-size docker-engine docker-engine-stop
container:
	SYNTHGEN_BASE=$(BASE) PY=$(PY) scripts/container.sh build

container-run:
	PORT=$(PORT) PY=$(PY) scripts/container.sh run

container-size:
	PY=$(PY) scripts/container.sh size

docker-engine:
	scripts/docker-engine.sh install && scripts/docker-engine.sh start

docker-engine-stop:
	scripts/docker-engine.sh stop
