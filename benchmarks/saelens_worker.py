"""Run inside the SAELens virtualenv (benchmarks/frontier.py --saelens): train SAELens' own trainers on
exactly the samples our recipes see (this repository's synthetic.py regenerates the stream from the same
seeds) and score them with this repository's `ground_truth_scores`.

    <saelens venv>/bin/python benchmarks/saelens_worker.py CONFIG.json   # prints one JSON line
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

SAELENS_RECIPES = {  # our recipe -> SAELens training config class and its sparsity field
    "StandardTrainer": ("StandardTrainingSAEConfig", None),
    "TopKTrainer": ("TopKTrainingSAEConfig", "k"),
    "BatchTopKTrainer": ("BatchTopKTrainingSAEConfig", "k"),
    "MatryoshkaBatchTopKTrainer": ("MatryoshkaBatchTopKTrainingSAEConfig", "k"),
    "JumpReluTrainer": ("JumpReLUTrainingSAEConfig", "target_l0"),
}


class _Scored(torch.nn.Module):
    """A trained SAELens SAE seen through the interface ground_truth_scores reads. A BatchTopK or
    Matryoshka SAE is scored as SAELens saves it for inference (a JumpReLU with every threshold at
    the learned `topk_threshold`), not with the training SAE's top-k over the evaluation batch."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae
        self.W_dec = sae.W_dec

    def encode(self, x):
        if not hasattr(self.sae, "topk_threshold"):
            return self.sae.encode(x)
        pre = self.sae.process_sae_in(x) @ self.sae.W_enc + self.sae.b_enc
        if self.sae.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.sae.W_dec.norm(dim=-1)
        return pre.relu() * (pre > self.sae.topk_threshold.to(pre.dtype))

    def decode(self, f):
        return self.sae.decode(f)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    _common.set_threads(config["threads"])
    _common.set_clock(config["clock"])
    _common.import_library()
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from dictionary_learning import HierarchicalActivations, ground_truth_scores

    class_name, field = SAELENS_RECIPES[config["recipe"]]
    sae_config = {"d_in": config["data"]["activation_dim"], "d_sae": config["dict_size"]}
    if field == "k":
        sae_config.update(k=config["level"], rescale_acts_by_decoder_norm=False)
    elif field == "target_l0":  # only the quadratic mode (Gemma Scope 2's) aims at target_l0; "step" ignores it
        sae_config.update(target_l0=config["level"], jumprelu_sparsity_loss_mode="quadratic")
    if config["recipe"] == "MatryoshkaBatchTopKTrainer":
        width = config["dict_size"]  # nested prefixes of 1/8 and 3/8 of it, as frontier.matryoshka_group_sizes
        sae_config["matryoshka_widths"] = [width // 8, width // 8 + width // 4, width]
    sae_config.update(config.get("sae_config", {}))  # e.g. l1_coefficient for the standard SAE
    torch.manual_seed(config["seed"])  # SAELens initialises from the global RNG
    sae = sae_lens.TrainingSAE.from_dict(getattr(sae_lens, class_name)(**sae_config).to_dict())
    train = HierarchicalActivations(seed=0, stream_seed=1000 + config["seed"], **config["data"])
    steps, batch = config["steps"], config["data"]["batch_size"]
    trainer_config = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * batch,
        device="cpu", autocast=False, lr=3e-4, lr_end=3e-4, lr_scheduler_name="constant",
        lr_warm_up_steps=steps // 10, adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1,
        train_batch_size_samples=batch, dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=10,
    )
    start = _common.CLOCKS[_common._clock_name]()
    SAETrainer(cfg=trainer_config, sae=sae, data_provider=(train.sample() for _ in range(steps + 1))).fit()
    seconds = _common.CLOCKS[_common._clock_name]() - start
    sae.eval()
    held_out = HierarchicalActivations(seed=0, stream_seed=99, **config["data"])
    with torch.no_grad():
        scores = ground_truth_scores(_Scored(sae), held_out, n_samples=config["n_eval"])
    print(json.dumps({**scores, "seconds": seconds, "saelens_version": sae_lens.__version__,
                      "finished": time.time()}))


if __name__ == "__main__":
    main()
