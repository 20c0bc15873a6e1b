"""Efficiency: parameter quantization (survey arXiv 2407.11046, "Efficiency Improving / Parameter
Quantization"): LoRA over a frozen quantized base.

- QLoRA (`qlora.py`): the base weight in NF4 with double quantization, LoRA in the compute dtype on
  top (eq. (5) of QLoRA: Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2).
- LoftQ (`loftq.py`): QLoRA whose base and adapter are initialised jointly, alternating
  Q_t = q_N(W - s B_{t-1} A_{t-1}) and s B_t A_t = SVD_r(W - Q_t) (Algorithm 1 of LoftQ), so that
  Q + s B A approximates W better than Q alone does (QLoRA starts from the quantization error W - Q).
- QA-LoRA (`qa_lora.py`): the base in group-wise int4; A acts on the input averaged over each
  quantization group (sec. 3.3 of QA-LoRA), which lets the trained adapter merge into the int4 zero
  points exactly.
- ApiQ (`apiq.py`) and L4Q (`l4q.py`), with the fake quantizer they share (`fake_quant.py`).
"""
