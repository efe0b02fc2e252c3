# An InternEvo-style config for Flux, written for the tests: like InternEvo-HFModels' Flux file it carries
# InternEvo's InternLM `model` section (which must not change Flux) and a `flux` section of its own.
JOB_NAME = "flux_train"
SEQ_LEN = 256
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168
CHECKPOINT_EVERY = 50

ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder="local:runs/flux_internevo",
    load_ckpt_folder="local:llm_ckpts/",
    load_ckpt_info=dict(path="local:llm_ckpts/49", content=("model",), ckpt_type="internevo"),
    auto_resume=True,
    checkpoint_every=CHECKPOINT_EVERY,
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
)
data = dict(seq_len=SEQ_LEN, micro_num=2, micro_bsz=1, total_steps=500, train_folder=None, valid_every=50)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=data["total_steps"], init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)
model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
)
flux = dict(
    data=dict(img_size=256, t5_max_length=256),
    model=dict(model_name="flux-schnell", weight_dtype="bfloat16"),
)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="isp"), pipeline=dict(size=1), weight=dict(size=1))
monitor = dict(tensorboard=dict(queue_max_length=10))
