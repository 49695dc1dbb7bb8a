"""mtl_zoo: multi-objective ranking models (MMoE, Shared-Bottom, ...) for TensorFlow."""

from setuptools import find_packages, setup

# pipelines.beam_convert. 2.77 is the release tested with TensorFlow 2.21 (it allows
# protobuf 6, which TF needs). Beam's TFRecord sink needs a crc32c library:
# google-crc32c ships wheels, apache-beam[tfrecord]'s crcmod only a source archive.
BEAM = ["apache-beam>=2.77,<3", "google-crc32c>=1.5"]
# The CSV and census sources read CSV with pyarrow's streaming, vectorised reader
# (pipelines/sources/csv.py); also `python -m mtl_zoo.predict --output=scores.parquet`.
PYARROW = "pyarrow>=10"
# scripts/baseline_logreg.py: logistic regression on sparse one-hot ids (scipy
# comes with it).
BASELINE = ["scikit-learn>=1.3"]
# python -m mtl_zoo.tune: TPE sampler, pruners, RDB (SQLite/any SQLAlchemy URL) storage.
TUNE = ["optuna>=4.2,<6"]

setup(
    name="mtl_zoo",
    version="0.1.0",
    description="Multi-task / multi-objective ranking model zoo on TensorFlow and Keras 2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mtl_zoo", "mtl_zoo.*", "pipelines", "pipelines.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "tf-keras>=2.16,<2.22",
        "tensorflow-recommenders==0.7.7",
        # Keras 3 (the process's choice, or MTL_ZOO_KERAS=3) and its DCN cross layer.
        "keras>=3.10",
        "keras-rs==0.4.0",
        "tensorboard>=2.16",
        "absl-py>=1.0",
        "tensorflow-serving-api>=2.16,<2.22",
        "numpy>=1.23",
        PYARROW,
        # Every run with eval data draws <model_dir>/reliability.png.
        "matplotlib>=3.5",
    ],
    extras_require={
        # Beam is in the test extra so that CI runs the Beam converter's test.
        # ... and scikit-learn, so that it runs the baseline script's test.
        # ... and optuna, so that it runs the search's tests.
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", *BEAM, *BASELINE, *TUNE],
        # Kept so that `pip install .[experiments]` still works; matplotlib is now core.
        "experiments": ["matplotlib>=3.5"],
        "beam": BEAM,
        "baseline": BASELINE,
        "tune": TUNE,
        # Kept so that `pip install .[parquet]` still works; pyarrow is now core.
        "parquet": [PYARROW],
    },
    entry_points={"console_scripts": ["mtl-zoo-train=mtl_zoo.train:run",
                                      "mtl-zoo-tune=mtl_zoo.tune:run"]},
)
