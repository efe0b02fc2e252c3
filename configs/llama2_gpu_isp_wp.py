"""A GPU run: a ~150M-parameter Llama (the tiny config grown by overrides), ISP 4 x FSDP2 4.

    torchrun --nproc-per-node 8 -m hfpatch.train llama2 -c configs/llama2_gpu_isp_wp.py --data corpus.jsonl --tokenizer TOKENIZER_DIR

With 8 GPUs: 2 ISP groups of 4 ranks (data parallel 2), weights sharded over 4.
dtype="auto": bf16 compute over float32 master weights (FSDP2 mixed precision).
"""

SEQ_LEN = 16 * 1024
HIDDEN = 1024

parallel = dict(
    tensor=dict(size=4, mode="isp"),
    weight=dict(size=4),
    zero1=dict(size=-1),
    pipeline=dict(size=1),
)
data = dict(
    seq_len=SEQ_LEN,
    micro_bsz=1,
    micro_num=4,
    use_packed_dataset=True,
    overflow="split",  # cut documents longer than SEQ_LEN into SEQ_LEN pieces
)
model = dict(
    hidden_size=HIDDEN,
    intermediate_size=HIDDEN * 8 // 3 // 64 * 64,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=SEQ_LEN,
    checkpoint=True,
    dtype="auto",
)
lr = 3e-4
min_lr = 3e-5
warmup_steps = 100
total_steps = 2000
weight_decay = 0.1
clip_grad_norm = 1.0
checkpoint_every = 200
keep_checkpoints = 2
