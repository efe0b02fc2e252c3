"""The README job as a config file: tiny Llama-2 on the embedded corpus, ISP over 2 ranks.

    hfpatch train llama2 -c configs/llama2_tiny_isp.py --nproc 2

Only plain assignments are allowed (the file is parsed, never executed). UPPER_CASE
names are local variables; every other name is a setting.
"""

SEQ_LEN = 512

parallel = dict(
    tensor=dict(size=2, mode="isp"),  # ISP: sequence split over 2 ranks, all-to-all around attention
    weight=dict(size=1),  # FSDP2 weight sharding group
    zero1=dict(size=-1),
    pipeline=dict(size=1),
)
data = dict(
    seq_len=SEQ_LEN,
    micro_bsz=1,  # packed rows per micro-batch
    micro_num=4,  # micro-batches per optimizer step
    use_packed_dataset=True,
    train_folder=None,  # None: the embedded pydoc corpus
    tokenizer_path=None,  # None: a BPE trained offline on that corpus
)
model = dict(
    checkpoint=False,  # activation checkpointing
    dtype="auto",
)
lr = 3e-3
warmup_steps = 3
total_steps = 30
checkpoint_every = 10
seed = 42
