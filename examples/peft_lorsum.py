"""Train a PEFT LoRA model with LoRSum: a tiny LLaMA from a local config, nothing downloaded.

    pip install lorsum[peft] && python examples/peft_lorsum.py

The model memorises one fixed batch of random tokens through rank-8 adapters on q_proj/v_proj.
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorsum

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
)  # fmt: skip
model = get_peft_model(
    LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
)

# LoRSum steps each adapter as full fine-tuning would (W ← W − lr·∂L/∂W), projected onto rank 8.
optimizer = lorsum.create_optimizer(model, "lorsum", lr=2.0, num_iters=2, max_grad_norm=1.0)
tokens = torch.randint(0, config.vocab_size, (8, 32))

for step in range(30):
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()  # the capture records each adapter's full gradient in factored form
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.4f}")

optimizer.capture.remove()  # take the gradient hooks off the model
