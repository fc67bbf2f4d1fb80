# xcam: two commands do everything.
#   make demo   install (if needed), materialize the whole lineage on the embedded
#               SYNTHETIC demo cohort, commit/push the data with DVC, serve the UI
#   make test   install (if needed) and run the tests
PYTHON ?= python3
VENV := .venv
DVC_VENV := .venv-dvc
export DAGSTER_HOME := $(CURDIR)/dagster_home
export GX_ANALYTICS_ENABLED := false
# glibc returns memory to the OS on every step otherwise (25-40% slower CPU training)
export MALLOC_MMAP_THRESHOLD_ := 17179869184
export MALLOC_TRIM_THRESHOLD_ := 17179869184

.PHONY: demo test setup ui lint browser postgres orthanc

# `exec`: the recipe's shell becomes `xcam ui`, which stops the UI's every process within 5 s
# of Ctrl-C or of the SIGTERM make passes on (xcam_assets.procs.supervise)
demo: setup
	$(VENV)/bin/xcam demo
	exec $(VENV)/bin/xcam ui

test: setup browser postgres orthanc
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed $(DVC_VENV)/.installed

# Extras: test (pytest & co.), crosscheck (quantus, the metric tests' reference
# implementations), k8s (dagster-k8s: the k8s executor config in resources/deploy/ is
# validated against its schema). Quantus requires `opencv-python`, which would overwrite
# grad-cam's opencv-python-headless (both install cv2/): resources/opencv-python-shim is an
# empty `opencv-python` that depends on the headless build (see the comment in pyproject.toml).
EXTRAS := test,crosscheck,k8s
SHIM := resources/opencv-python-shim

$(VENV)/.installed: pyproject.toml resources/constraints.txt $(SHIM)/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c resources/constraints.txt ./$(SHIM) \
		-e '.[$(EXTRAS)]'
	$(VENV)/bin/python -m pip check
	touch $@

# DVC in its own environment: its hydra/omegaconf pin antlr 4.9, dagster needs 4.13
$(DVC_VENV)/.installed:
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DVC_VENV)/bin/python -m pip install --quiet 'dvc==3.67.1'
	touch $@

# headless Chromium (Debian's package) for the browser tests of the UI and the audit
# report, driven by Playwright (the `playwright` Python package, a test extra; its own
# browser download is not used). Installed when missing and we are root; else they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; \
	  else echo "chromium missing and not installable here: the browser tests will skip"; fi; }

# a PostgreSQL server (Debian's package) for tests/test_postgres.py, which runs the demo
# lineage on the production instance file (resources/deploy/dagster_postgres.yaml) against
# a throw-away cluster of its own on 127.0.0.1 (the package's own cluster is not used).
# Installed when missing and we are root; else that test skips.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian postgresql for the Postgres instance test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
	      >/dev/null; \
	  else echo "postgresql missing and not installable here: the Postgres test will skip"; fi; }

# Orthanc with its DICOMweb plugin (Debian's `orthanc` + `orthanc-dicomweb`) for
# tests/pacs/, which start a throw-away server of their own on 127.0.0.1 (the package's own
# service is not used). Installed when missing and we are root; else those tests skip.
orthanc:
	@{ command -v Orthanc >/dev/null 2>&1 || test -x /usr/sbin/Orthanc; } && \
	  ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian orthanc + orthanc-dicomweb for the PACS tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc \
	      orthanc-dicomweb >/dev/null; \
	  else echo "orthanc missing and not installable here: the PACS DICOMweb tests will skip"; fi; }

ui: setup
	exec $(VENV)/bin/xcam ui

lint: setup
	$(VENV)/bin/ruff check xcam_assets tests
