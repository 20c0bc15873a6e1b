"""The method registry: lazy entries "module:Class", looked up by lower-case name.

Adding a method: write `lorabench/methods/<name or family>/` with a config dataclass and a
`Method` subclass, then add one `register_lazy` line below (docs/adding-a-method.md).
"""
from lorabench.registry import Registry

METHODS: Registry = Registry("method")

# Baselines
METHODS.register_lazy("full", "lorabench.methods.baselines:FullFineTuning")
METHODS.register_lazy("head", "lorabench.methods.baselines:HeadOnly")
# LoRA (arXiv 2106.09685)
METHODS.register_lazy("lora", "lorabench.methods.lora:LoRA")
# Methods II (issue 8): the rest of the survey's single-task methods
METHODS.register_lazy("relora", "lorabench.methods.bottleneck.relora:ReLoRA")
METHODS.register_lazy("cola", "lorabench.methods.bottleneck.cola:CoLA")
METHODS.register_lazy("delta-lora", "lorabench.methods.bottleneck.delta_lora:DeltaLoRA")
METHODS.register_lazy("flora", "lorabench.methods.bottleneck.flora:FLoRA")
METHODS.register_lazy("melora", "lorabench.methods.bottleneck.melora:MELoRA")
METHODS.register_lazy("mora", "lorabench.methods.bottleneck.mora:MoRA")
METHODS.register_lazy("lora-dropout", "lorabench.methods.procedure.lora_dropout:LoraDropout")
METHODS.register_lazy("sibo", "lorabench.methods.procedure.sibo:SIBO")
METHODS.register_lazy("lora-sp", "lorabench.methods.reduction.lora_sp:LoraSP")
METHODS.register_lazy("aflora", "lorabench.methods.reduction.aflora:AFLoRA")
METHODS.register_lazy("dropbp", "lorabench.methods.reduction.dropbp:DropBP")
METHODS.register_lazy("lte", "lorabench.methods.bottleneck.lte:LTE")
METHODS.register_lazy("reslora", "lorabench.methods.procedure.reslora:ResLoRA")
METHODS.register_lazy("laplace-lora", "lorabench.methods.procedure.laplace_lora:LaplaceLoRA")
METHODS.register_lazy("hiddenkey", "lorabench.methods.procedure.hiddenkey:HiddenKey")
METHODS.register_lazy("lora-drop", "lorabench.methods.reduction.lora_drop:LoraDrop")
METHODS.register_lazy("bilora", "lorabench.methods.procedure.bilora:BiLoRA")
METHODS.register_lazy("autolora", "lorabench.methods.procedure.autolora:AutoLoRA")
METHODS.register_lazy("star", "lorabench.methods.procedure.star:STAR")
METHODS.register_lazy("salora", "lorabench.methods.dynamic_rank.salora:SaLoRA")
METHODS.register_lazy("increlora", "lorabench.methods.dynamic_rank.increlora:IncreLoRA")
METHODS.register_lazy("loraprune", "lorabench.methods.reduction.loraprune:LoraPrune")
METHODS.register_lazy("lorashear", "lorabench.methods.reduction.lorashear:LoraShear")
METHODS.register_lazy("lora-layer-pruning", "lorabench.methods.reduction.layer_pruning:LayerPruningLoRA")
METHODS.register_lazy("alora", "lorabench.methods.dynamic_rank.alora:ALoRA")
METHODS.register_lazy("longlora", "lorabench.methods.longctx:LongLoRA")
METHODS.register_lazy("sinklora", "lorabench.methods.longctx:SinkLoRA")
# Methods I (issue 6): the core LoRA family
METHODS.register_lazy("rslora", "lorabench.methods.rslora:RsLoRA")
METHODS.register_lazy("dora", "lorabench.methods.dora:DoRA")
METHODS.register_lazy("pissa", "lorabench.methods.pissa:PiSSA")
METHODS.register_lazy("milora", "lorabench.methods.pissa:MiLoRA")
METHODS.register_lazy("lora-fa", "lorabench.methods.lora_fa:LoRAFA")
METHODS.register_lazy("lora-plus", "lorabench.methods.lora_plus:LoRAPlus")
METHODS.register_lazy("vera", "lorabench.methods.vera:VeRA")
METHODS.register_lazy("qlora", "lorabench.methods.quantized:QLoRA")
METHODS.register_lazy("loftq", "lorabench.methods.quantized:LoftQ")
METHODS.register_lazy("qa-lora", "lorabench.methods.quantized:QALoRA")
METHODS.register_lazy("adalora", "lorabench.methods.adalora:AdaLoRA")
METHODS.register_lazy("fourierft", "lorabench.methods.fourierft:FourierFT")
METHODS.register_lazy("vb-lora", "lorabench.methods.vb_lora:VBLoRA")
METHODS.register_lazy("riemannian", "lorabench.methods.riemannian:RiemannianLoRA")
METHODS.register_lazy("lora-xs", "lorabench.methods.lora_xs:LoRAXS")
METHODS.register_lazy("sora", "lorabench.methods.sora:SoRA")
METHODS.register_lazy("dylora", "lorabench.methods.dylora:DyLoRA")
METHODS.register_lazy("dora-rank", "lorabench.methods.dora_rank:DoraRank")
# Issue 16 (part b): the survey's remaining single-task methods
METHODS.register_lazy("lora-init-b", "lorabench.methods.procedure.lora_init_b:LoRAInitB")
METHODS.register_lazy("apiq", "lorabench.methods.quantized.apiq:ApiQ")
METHODS.register_lazy("l4q", "lorabench.methods.quantized.l4q:L4Q")
METHODS.register_lazy("byom-lora", "lorabench.methods.reduction.byom_lora:ByomLoRA")
METHODS.register_lazy("pillow", "lorabench.methods.procedure.pillow:Pillow")


def get_method(name: str):
    """The Method class registered as `name` (UserError with did-you-mean otherwise)."""
    return METHODS.get(name)
