"""Fine-tune a local InternLM-7B checkpoint (HF format) on your own jsonl, ISP 8.

    torchrun --nnodes 2 --nproc-per-node 8 ... -m hfpatch.train internlm1 -c configs/internlm1_finetune.py

The tokenizer comes from model_path unless data.tokenizer_path is set.
"""

model_path = "/path/to/internlm-7b"

parallel = dict(tensor=dict(size=8, mode="isp"), weight=dict(size=8), zero1=dict(size=-1))
data = dict(
    train_folder="/path/to/train.jsonl",  # one {"text": ...} per line
    text_field="text",
    seq_len=8192,
    micro_num=8,
    overflow="error",  # refuse documents longer than seq_len instead of cutting them
)
model = dict(checkpoint=True)
lr = 2e-5
min_lr = 2e-6
warmup_steps = 50
total_steps = 1000
checkpoint_every = 100
export = "exports/internlm1-finetuned"
