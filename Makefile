PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements.stamp

.PHONY: venv demo demo-quality test test-fast lint bench clean-venv

# (Re)create the environment when it is missing or requirements.txt changed.
$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt
	cp requirements.txt $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

# The longer recipe of the demo (see README: accuracy against training minutes).
demo-quality: $(STAMP)
	$(BIN)/python demo.py --preset quality

# pytest exits 5 when it collected no test: that must fail, not pass silently. --durations: the log names
# the slowest tests, where the suite's time goes.
test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# The fast tier: no end-to-end trainer run, no XLA step compilation (unit tests, CLI errors that stop before
# device work, the import rules); a few minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/step_time.py
	$(BIN)/python bench/latent_step_time.py
	$(BIN)/python bench/latent_loader.py
	$(BIN)/python bench/encode_throughput.py
	$(BIN)/python bench/checkpoint.py

clean-venv:
	rm -rf $(VENV)
