# The README's two commands: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo

.PHONY: demo test test-all install clean-demo demo-fetch demo-track

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray,fetch]'
	touch $(STAMP)

install: $(STAMP)

HOLDOUT ?= Herschel
SEEDS ?= 3
CROSSVAL := $(DEMO)/tensorboard/crossval
# The demo's runs (experiments/demo.yaml: unet, resnet18), one per seed; predict averages them.
RUNS ?= $(foreach seed,$(shell seq 0 $$(($(SEEDS) - 1))),--run $(CROSSVAL)/unet_resnet18/$(HOLDOUT)/seed$(seed))

demo: $(STAMP)
	$(VENV)/bin/rts-tf demo-data $(DEMO)/data --seed 0 --time-series
	$(VENV)/bin/rts-tf build-records --config experiments/demo-records.yaml --out records/demo
	$(VENV)/bin/rts-tf inspect records/demo --previews $(DEMO)/previews --tensorboard $(DEMO)/tensorboard/records
	$(VENV)/bin/rts-tf crossval --grid experiments/demo.yaml --records records/demo --regions $(HOLDOUT) \
		--seeds $(SEEDS) --logdir $(CROSSVAL)
	$(VENV)/bin/rts-tf predict $(RUNS) --overwrite \
		--scene $$($(PY) -c "import json, pathlib; m = json.load(open('records/demo/manifest.json')); \
		print(next(pathlib.Path(s['sources']['sr']).parent for s in m['scenes'] if s['region'] == '$(HOLDOUT)'))") \
		--dem $(DEMO)/data/auxiliary/dem --tcvis $(DEMO)/data/auxiliary/tcvis --sites $(DEMO)/data/sites.geojson \
		--out $(DEMO)/predictions
	$(MAKE) --no-print-directory demo-track
	@echo
	@echo "Held-out scores over $(SEEDS) seeds (mean ± sd): $(CROSSVAL)/crossval.md"
	@echo "TensorBoard (records previews, training curves, image panels, HParams):"
	@echo "  $(VENV)/bin/tensorboard --logdir $(DEMO)/tensorboard"
	@echo "Maps of the held-out region ($(HOLDOUT)): $(DEMO)/predictions (GeoTIFFs and rts_polygons.gpkg open in QGIS)"

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

clean-demo:
	rm -rf $(DEMO) records/demo

# Real data from open catalogues (needs the network; see README "Fetching inputs"). AOI: a polygon
# file; LABELS: slump polygons over it. TCVIS is published through Earth Engine only: the records leave it
# out (BANDS=optical+terrain) unless TCVIS=file BANDS=all are given.
AOI ?= aoi.gpkg
DATES ?= 2022-07-01/2022-08-31
FETCH ?= fetched
LABELS ?= labels.gpkg
TCVIS ?=
BANDS ?= optical+terrain
REGION ?= MyArea

demo-fetch: $(STAMP)
	$(VENV)/bin/rts-tf fetch sentinel2 --aoi $(AOI) --dates $(DATES) --out $(FETCH)/sentinel2
	$(VENV)/bin/rts-tf fetch dem --scenes $(FETCH)/sentinel2 --resolution 10 --out $(FETCH)/dem
	$(VENV)/bin/rts-tf build-records --scenes $(FETCH)/sentinel2 --dem $(FETCH)/dem/dem.vrt --bands $(BANDS) \
		$(if $(TCVIS),--tcvis $(TCVIS)) \
		--labels $(LABELS) --default-region $(REGION) --tile-size 128 --out $(FETCH)/records
	$(VENV)/bin/rts-tf fit --records $(FETCH)/records --arch unet --encoder resnet18 --epochs 20 --batch-size 8 \
		--logdir $(FETCH)/run
	$(VENV)/bin/rts-tf predict --run $(FETCH)/run --scene $(FETCH)/sentinel2 --dem $(FETCH)/dem/dem.vrt \
		$(if $(TCVIS),--tcvis $(TCVIS)) --out $(FETCH)/predictions

# Slump dynamics on the demo's time series (issue 20): predict its four dates with a trained run
# (RUNS, by default the demo's seeds as `--run DIR ...`) and link the detections with `rts-tf track`; also tracks the truth
# labels, whose statuses are known (demo/timeseries/tracks_truth).
SERIES := $(DEMO)/data/timeseries

demo-track: $(STAMP)
	test -f $(SERIES)/labels.gpkg || $(VENV)/bin/rts-tf demo-data $(DEMO)/data --seed 0 --time-series
	$(VENV)/bin/rts-tf predict $(RUNS) --scene $(SERIES)/scenes --dem $(SERIES)/auxiliary/dem \
		--tcvis $(SERIES)/auxiliary/tcvis --sites $(SERIES)/sites.geojson --out $(DEMO)/timeseries/predictions --overwrite
	$(VENV)/bin/rts-tf track $(DEMO)/timeseries/predictions --out $(DEMO)/timeseries/tracks --overwrite
	$(VENV)/bin/rts-tf track $(SERIES)/labels.gpkg --out $(DEMO)/timeseries/tracks_truth --overwrite
	@echo "Slump histories: $(DEMO)/timeseries/tracks (tracks.gpkg, change.tif, summary.csv, *.png open in QGIS)"
