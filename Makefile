# One entry point for a fresh machine: `make test` or `make demo` create .venv and install first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv test demo lint clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .venv

demo: $(STAMP)
	$(PY) -m videoprefill.run videoprefill/assets/sample.mp4 --model demo --attention compare --sparsity-map sparsity.png \
		-q "What colour is the flash? Answer with one word."
