# An InternEvo-style fine-tuning config written for the tests (InternEvo's config language and key set:
# f-strings, int(...), arithmetic, lookups of earlier sections, comments and docstrings between sections).
model_type = "HF"
HF_MODEL_NAME = "tiny-org/tiny-llama"
DATASET = "tiny-org/tiny-stories"
JOB_NAME = f"finetune_{model_type}/{HF_MODEL_NAME}"
DO_ALERT = False

SEQ_LEN = 2 ** 11
HIDDEN = 64
LAYERS = 2
SAVE_FOLDER = "local:" + f"runs/internevo_{LAYERS}x{HIDDEN:03d}"
EVERY = 1000

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=SAVE_FOLDER,
    load_ckpt_info=dict(path=HF_MODEL_NAME, content=("model",), ckpt_type="hf_model"),
    auto_resume=True,
    checkpoint_every=EVERY,
    async_upload=True,
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(EVERY / 2),
)

data = dict(
    type="hf",
    tokenizer_path=HF_MODEL_NAME,
    train_folder=DATASET,
    seq_len=SEQ_LEN,
    micro_num=max(2, 4 // 2),
    micro_bsz=1,
    valid_micro_num=4,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=50_000,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,
    valid_folder=None,
    use_packed_dataset=SEQ_LEN >= 1024 and not DO_ALERT,
    use_shm=False,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=0.5,
)

loss = dict(label_smoothing=0)

adam = dict(
    lr=1e-4,
    adam_beta1=0.9,
    adam_beta2=0.98,
    adam_beta2_c=0,
    adam_eps=1e-6,
    weight_decay=0.05,
)

lr_scheduler = dict(
    total_steps=data["total_steps"],
    init_steps=0,
    warmup_ratio=0.02,
    eta_min=round(adam["lr"] / 10, 8),
    last_epoch=-1,
)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

use_fp32_norm = False
model = dict(
    checkpoint=0.5,  # half of the layers recompute in backward
    dtype="torch.float32",
    num_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=1024,
    mlp_ratio=8 / 3,
    embed_split_hidden=True,
    parallel_output=False,
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)
"""
A string between sections, as InternEvo's files document parallel.* there.
"""
parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1, interleaved_overlap=True),
    weight=dict(size=1, overlap=False, memory_pool=True),
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        alert_file_path=f"llm_alter/{JOB_NAME}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
