from setuptools import find_packages, setup

# torch is deliberately not pinned here beyond a floor: install the torch build that matches your
# machine first (CUDA on GPU clusters, `pip install torch==2.13.0` on a CPU box), then this package.
setup(
    name="dpo_ds",
    version="0.1.0",
    description="Direct Preference Optimization on DeepSpeed (ZeRO-2/3, offload), SFT -> DPO/IPO/cDPO",
    packages=find_packages(include=["dpo_ds", "dpo_ds.*"]),
    # every file the package reads at run time that is not Python (tests/test_packaging.py checks the wheel)
    package_data={
        "dpo_ds": [
            "demo/data/*.jsonl",
            "demo/model/*",
            "demo/tiny/*",
            "demo/tiny_moe/*",
            "ds_configs/*.json",  # --ds zero3; a clone's top-level ds_configs/ links here
            "recipes/*.yaml",  # --config NAME, dpo-ds recipes; a clone's top-level configs/ links here
            "plan/models/*/*/config.json",  # the recipes' models, planned before they are downloaded
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "accelerate>=1.1",  # transformers needs it to build models under ZeRO-3 (HfDeepSpeedConfig)
        "datasets>=3.0",
        "sentencepiece",
        "safetensors",
        "xxhash",  # checkpoint checksums (engine/checksum.py); datasets needs it too
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "wandb": ["wandb"],
        "plot": ["matplotlib"],
        "docs": [
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.7,<10",
        ],  # the manual: mkdocs serve / mkdocs build --strict
        "triton": ["triton"],
        "lora": ["peft>=0.17"],  # LoRA adapters (model.lora.r > 0)
        "test": [
            "pytest",
            "ruff",
            "import-linter",
            "matplotlib",
            "wandb",
            "triton",
            "peft>=0.17",
            "trl==1.16.0",
        ],
        "bench": ["trl==1.16.0", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "dpo-ds=dpo_ds.cli.main:main",
            "dpo-ds-plot=dpo_ds.cli.plot:main",
            "dpo-ds-export=dpo_ds.cli.export:main",
        ]
    },
)
