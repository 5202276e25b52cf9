# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_TIME ?= 20m
DEMO_RUN := runs/multi30k_de_en
DEMO_DATA := data/multi30k-de-en

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check mt tests scripts
	$(BIN)/ruff format --check mt tests scripts

$(DEMO_DATA)/manifest.json: | $(VENV)/.installed
	$(BIN)/mt data fetch multi30k --pair de-en

# fetch Multi30k, train for $(DEMO_TIME), translate a sentence, score the test set
demo: install $(DEMO_DATA)/manifest.json
	$(BIN)/mt train configs/multi30k_de_en.yaml --max-time $(DEMO_TIME)
	echo "Ein Mann fährt Fahrrad." | $(BIN)/mt translate $(DEMO_RUN) --beam 5
	$(BIN)/mt eval $(DEMO_RUN) --src $(DEMO_DATA)/test.de --ref $(DEMO_DATA)/test.en

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
