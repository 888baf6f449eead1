"""What bench/paper/compare.py compares, and how: its settings, the methods and the goals, as data.

`Settings` is the run's configuration, one frozen object built from the command line (each flag
is declared once, on its field, via mobillm.common.options) and passed explicitly; values found
during the run (the work folder, the split layer, the mobillm epochs) make a new one with
`dataclasses.replace`. `METHODS` is the table of methods, `GOALS` the paper's thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobillm.bench.paths import ROOT
from mobillm.common.options import option

GLUE_DIRS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "qnli": "QNLI",
             "qqp": "QQP", "mnli": "MNLI"}
PLAN_EPOCHS = 100  # batches planned for the time-budgeted methods (they stop at the budget)


@dataclass(frozen=True)
class Server:
    """How a mobillm method reaches its `trainer serve`."""

    mode: str  # what the device sends: pooled or tokens
    cache: bool  # the server's --cache
    throttled: bool  # the uplink goes through a LinkProxy at --link-mbps
    weights: str  # the engine's weight format (an engine exported per format)

    @property
    def key(self) -> str:
        """Which server process it uses: one per --cache flavour."""
        return "cache" if self.cache else "plain"


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    description: str
    colour: str  # of its curve in the plot
    lr: str | None = None  # the Settings field holding its peak learning rate (on-device methods)
    server: Server | None = None  # mobillm methods: trained by a `trainer serve` process


METHODS = {
    "full": Method("Full fine-tuning (torch, AdamW)", "C0", lr="lr_full"),
    "lora": Method("LoRA (PEFT, r 16, q_proj/v_proj)", "C1", lr="lr_lora"),
    "lora64": Method("LoRA (PEFT, r 64, q_proj/v_proj)", "olive", lr="lr_lora"),
    "bitfit": Method("BitFit (biases + head)", "C2", lr="lr_bitfit"),
    "split": Method("Split learning, every parameter (device: embeddings + lower layers, fwd + bwd)", "C3",
                    lr="lr_full"),
    "split-bitfit": Method("Split learning + BitFit, the paper's baseline (device: embeddings + lower layers, "
                           "biases train; server: its biases + head)", "brown", lr="lr_bitfit"),
    "lst": Method("LST (ladder side network, d/8, pruned from the backbone; backbone forward-only)", "teal",
                  lr="lr_lst"),
    "mobillm-local": Method("MobiLLM-L (ORT backbone + side network on the device)", "C4", lr="lr_side"),
    "mobillm-pooled": Method("mobillm, pooled", "C5", server=Server("pooled", False, False, "fp32")),
    "mobillm-tokens": Method("mobillm, tokens", "C6", server=Server("tokens", False, False, "fp32")),
    "mobillm-cache": Method("mobillm, pooled + server --cache", "C7", server=Server("pooled", True, False, "fp32")),
    "mobillm-60mbps": Method("mobillm, pooled, uplink throttled", "C8", server=Server("pooled", False, True, "fp32")),
    "mobillm-int8": Method("mobillm, pooled, engine with int8 weights (README's deployment)", "C9",
                           server=Server("pooled", False, False, "int8")),
    "mobillm-int4": Method("mobillm, pooled, engine with int4 weights (MatMulNBits, weight-only)", "black",
                           server=Server("pooled", False, False, "int4")),
}
SPLIT_METHODS = ("split", "split-bitfit")  # cut after --split-layer; device numbers from a device-only process


@dataclass(frozen=True)
class Goal:
    """The paper's claim: `numerator`'s `key` / `denominator`'s is at most `limit`."""

    name: str
    numerator: str
    denominator: str
    key: str  # a summary row field: peak_rss_mb or time_to_target_s
    limit: float


GOALS = [
    Goal("device memory mobillm-pooled / LoRA", "mobillm-pooled", "lora", "peak_rss_mb", 0.25),
    Goal("device memory mobillm-pooled / Full-FT", "mobillm-pooled", "full", "peak_rss_mb", 0.2),
    Goal("device memory mobillm-int8 / LoRA", "mobillm-int8", "lora", "peak_rss_mb", 0.25),
    Goal("device memory mobillm-int8 / Full-FT", "mobillm-int8", "full", "peak_rss_mb", 0.2),
    Goal("device memory mobillm-int4 / LoRA", "mobillm-int4", "lora", "peak_rss_mb", 0.25),
    Goal("time to target mobillm-pooled / LoRA", "mobillm-pooled", "lora", "time_to_target_s", 0.43),
    Goal("time to target mobillm-cache / LoRA", "mobillm-cache", "lora", "time_to_target_s", 0.2),
]
BYTES_GOAL = ("bytes/sample padded-256 / pooled", 50)  # at least this many times fewer bytes, pooled


@dataclass(frozen=True)
class Settings:
    """Every option of a comparison run."""

    model: str = option("opt-350m", "short name (random init from export/configs) or an HF id / checkpoint folder "
                                    "(real weights)")
    task: str = option("sst2", "task preset (data from ../shared/data/glue)")
    batch_size: int = option(16, "rows per batch, every method")
    max_len: int = option(128, "truncate rows to this many tokens")
    budget_minutes: float = option(2.0, "training wall-clock per method")
    overrides: tuple[str, ...] = option((), "model config override, as export-backbone --set (e.g. hidden_size=64)",
                                        cli=False)  # --set, repeated: declared in compare.build_parser
    methods: tuple[str, ...] = option(tuple(METHODS), f"comma list of {', '.join(METHODS)}")
    train_rows: int = option(512, "training rows (a seeded random subset)")
    dev_rows: int = option(200, "dev rows (a seeded random subset)")
    data_dir: Path | None = option(None, "folder with train.tsv and dev.tsv", parse=Path)
    tokenizer: Path | None = option(None, "tokenizer folder for the export (default ../shared/data/tokenizer/opt)",
                                    parse=Path)
    quant: str = option("nf4", "tap format of the engine")
    seed: int = option(0, "random-init, data subset and data order seed")
    data_seed: int | None = option(None, "seed of the train / holdout / dev subsets alone (default: --seed): "
                                         "bench/paper/parity.py keeps the rows and varies --seed")
    holdout_rows: int = option(400, "train rows held out (never the dev set): every method is scored on them at "
                                    "every evaluation, and its reported point is the one with the best holdout "
                                    "metric (0: off)")
    evals: int = option(4, "evaluations per run (plus one at t = 0)")
    no_zero_eval: bool = option(False, "skip the evaluation at t = 0")
    target_frac: float = option(0.95, "target = this x the best metric after the budget")
    split_layer: int | None = option(None, "split learning cut (default: a quarter of the layers)")
    split_device_steps: int = option(16, "steps of the split / split-bitfit device-memory processes")
    link_mbps: float = option(60.0, "uplink of the throttled mobillm run and of split learning's transfers")
    lr_full: float = option(5e-5, "peak lr, Full-FT and split")
    lr_lora: float = option(5e-4, "peak lr, LoRA")
    lr_bitfit: float = option(1e-3, "peak lr, BitFit")
    lr_lst: float = option(1e-3, "peak lr, LST (the LST paper's GLUE setting, 3e-3, unsettles the side "
                                      "network's pruned Gemma weights: docs/benchmarks.md)")
    lr_side: float = option(1e-3, "peak lr, side network (mobillm, MobiLLM-L)")
    mobillm_epochs: int | None = option(None, "epochs of the mobillm runs (default: sized to the budget from the "
                                              "measured forward rate)")
    fill: float = option(0.7, "share of the budget the mobillm runs are sized to")
    cache_epochs: int | None = option(None, "epochs of the --cache runs (default: sized to --cache-fill of the budget "
                                            "from the measured forward rate and cached step rate)")
    cache_fill: float = option(0.9, "share of the budget the --cache runs' declared epochs are sized to "
                                    "(with --cache-select \"\")")
    cache_select: list[int] = option(help="candidate cached epochs the --cache server chooses among on its own "
                                          "held-out cached samples (trainer serve --select-epochs; its lr stays "
                                          "--lr-side); the device declares 2 epochs, which shape only the streamed "
                                          "epoch's schedule. \"\": no selection, the epochs sized to --cache-fill",
                                     default_factory=lambda: [1, 2, 3, 4, 6, 8])
    cache_select_lrs: list[float] = option(help="with --cache-select: candidate peak lrs too (trainer serve "
                                                "--select-lrs; default: --lr-side alone)", default_factory=list)
    cache_ensemble: int = option(1, "with --cache-select: side networks the --cache server trains with its choice "
                                    "(trainer serve --ensemble); the returned ONNX averages their logits")
    cache_replay: int = option(0, "the --cache server trains up to this many batches from its cache in each gap "
                                  "between two streamed batches (trainer serve --replay): the streamed network "
                                  "learns faster; with --cache-select the returned network is unchanged")
    max_epochs: int = option(50, "cap on the sized mobillm epochs")
    threads: int | None = option(None, "torch/ORT threads in the method processes")
    jobs: int = option(1, "on-device methods run this many at a time; above 1 the timings are not comparable "
                          "(smoke tests only)")
    server_threads: int = option(1, "torch threads of trainer serve")
    server_device: str = option("cpu", "torch device of trainer serve: cpu, cuda, cuda:N")
    timeout_factor: float = option(3.0, "a method is stopped after this x budget + 300 s")
    mem_limit: int = option(16_000_000_000, "address-space cap per process (bytes)")
    engines: Path = option(ROOT / "engines", "engine cache folder", parse=Path)
    engine: Path | None = option(None, "use this exported engine (random-init or not); its manifest's config sets "
                                       "the dims of every method", parse=Path)
    engine_int8: Path | None = option(None, "with --engine: the same model exported with --weights int8 (for "
                                            "mobillm-int8)", parse=Path)
    engine_int4: Path | None = option(None, "with --engine: the same model exported with --weights int4 (for "
                                            "mobillm-int4)", parse=Path)
    work: Path | None = option(None, "keep run files here (default: a temp folder)", parse=Path)
    reuse: bool = option(False, "with --work: reuse on-device methods already run there with the same settings "
                                "(an interrupted comparison)")
    summarize_only: bool = option(False, "with --work (and the run's other options): rebuild the table, JSON and "
                                         "plot from the results.json of a finished run there; nothing is run again")
    json_out: Path | None = option(None, "write the summary JSON here", parse=Path)
    markdown_out: Path | None = option(None, "write the table here", parse=Path)
    plot: Path = option(ROOT / "docs" / "img" / "compare.png", "plot path", parse=Path)
    forward_s_per_row: float | None = option(None, "the device's measured forward seconds per row", cli=False)
    cached_s_per_step: float | None = option(None, "the --cache server's measured seconds per cached step", cli=False)

    @property
    def subset_seed(self) -> int:
        """Which rows: --data-seed, or --seed."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def budget_s(self) -> float:
        """Training wall-clock per method, seconds."""
        return self.budget_minutes * 60

    @property
    def timeout_s(self) -> float:
        """When a method's process is stopped."""
        return self.budget_s * self.timeout_factor + 300
