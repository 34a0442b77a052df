"""Fine-tune Meta's pretrained ESMFold (esmfold_3B_v1) on your own structures, through LoRTA adapters.

The trunk and heads start from a fair-esm ESMFold checkpoint; the trunk stays frozen, and one LoRTA
adapter adapts both the ESM-2 3B language model and the folding trunk's attention (sequence and triangle
attention, one CP tensor per family). The confidence heads (pLDDT; pTM too when loss.tm.weight > 0)
train beside the adapters, so that pLDDT follows the fine-tuned model (model.trainable=confidence; in
the CPU fine-tuning demonstration this halved the new family's pLDDT calibration error at no cost in
LDDT-Cα; measured there only, not at ESMFold's scale). Freeze them with --set model.trainable= . Give the two files (neither is downloaded on an offline
machine):

    --set model.init_from=/path/to/esmfold_3B_v1.pt      (fair-esm's ESMFold file, required)
    --set model.lm.path=/path/to/esm2_t36_3B_UR50D.pt    (the ESM-2 it was trained with)

and your structures (`data.train_dir`, `data.val_dir`, or OpenFold's layout). The trunk below is
ESMFold v1's architecture (48 blocks, c_s 1024, c_z 128, structure module 384/128, pLDDT head 128);
the run refuses a checkpoint whose architecture differs and names each difference. A GPU job.
"""

from esmfold_peft.fold.run.config import base_config, structure_module_config, trunk_config


def get_config():
    cfg = base_config()
    cfg.name = "esmfold_finetune"
    cfg.model.init_from = ""  # a fair-esm ESMFold checkpoint (esmfold_3B_v1.pt); required for this config
    cfg.model.lm.name = "esm2_t36_3B_UR50D"  # what esmfold_3B_v1 was trained with (esm_type esm2_3B)
    cfg.model.trunk = trunk_config(num_blocks=48, c_s=1024, c_z=128, seq_head_width=32, pair_head_width=32,
                                   structure_module=structure_module_config(c_s=384, c_z=128, no_blocks=8,
                                                                            no_heads_ipa=12, c_ipa=16,
                                                                            c_resnet=128, dropout_rate=0.1))
    cfg.model.lddt_head_hid_dim = 128
    cfg.model.checkpoint_blocks = True
    cfg.model.trainable = "confidence"  # the pLDDT/pTM heads calibrate; trunk, structure module, embeddings frozen
    cfg.adapter.method = "lorta"
    cfg.adapter.scope = "both"  # the LM and the trunk's attention
    cfg.adapter.rank = 8
    cfg.optim.lr = 5e-4
    cfg.optim.warmup_steps = 200
    cfg.optim.decay_start = 5_000
    cfg.optim.decay_every = 5_000
    cfg.train.steps = 20_000
    cfg.train.crop_size = 256
    cfg.train.batch_size = 1
    cfg.train.effective_batch_size = 8
    cfg.train.max_recycles = 3
    cfg.train.log_every = 50
    cfg.train.val_every = 1_000
    cfg.train.ckpt_every = 1_000
    cfg.data.source = "dir"
    cfg.val.num_recycles = 3  # fair-esm's default: 4 trunk passes
    return cfg
