# Two commands: `make demo` (the main job) and `make test`. Each sets up .venv first
# when it is missing or out of date.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo attention-demo test test-gpu bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@# The speech data sets are synthesized with espeak-ng: install it where we can.
	@command -v espeak-ng >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get install -y -q espeak-ng >/dev/null) \
		|| echo "note: espeak-ng not installed; the speech configs need it (apt-get install espeak-ng)"
	touch $(STAMP)

# The main job: train a ViT on the embedded digits, ending with its validation accuracy.
demo: $(STAMP)
	$(VENV)/bin/zoo fit -c configs/vision/vit_digits.yaml

# The attention kernels: a correctness check against float64 and a quick benchmark.
attention-demo: $(STAMP)
	$(VENV)/bin/zoo demo

test: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine: the GPU tests and the benchmark.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(VENV)/bin/zoo bench attention

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
