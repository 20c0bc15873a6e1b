"""The method registry: lazy entries "module:Class", looked up by lower-case name.

Every method has one home by the survey's taxonomy: `lorabench/methods/<family>/<name>.py`, the
family folder being its `family` key with "-" as "_" (`FAMILIES` in base.py) and the file its
registered name with "-" as "_" (`dora` -> low_rank_bottleneck/dora.py); layers and helpers that
several methods share sit beside them in the family that owns them (the LoRA layer in lora/).
Adding a method: write that file with a config dataclass and a `Method` subclass, then add one
`register_lazy` entry below with its family, paper and title (docs/adding-a-method.md).
"""
from lorabench.registry import Registry

# family, paper (arXiv id; "" for a baseline) and title: what `list methods` shows without importing
# the method (lorabench/registry.py); tests check them against the class's attributes.
METHODS: Registry = Registry("method", meta_keys=("family", "paper", "title"))

# Baselines
METHODS.register_lazy("full", "lorabench.methods.baseline.full:FullFineTuning", family="baseline", paper="",
                      title="Full fine-tuning")
METHODS.register_lazy("head", "lorabench.methods.baseline.head:HeadOnly", family="baseline", paper="",
                      title="Frozen backbone, trained task head")
# LoRA (arXiv 2106.09685)
METHODS.register_lazy("lora", "lorabench.methods.lora.lora:LoRA", family="lora", paper="2106.09685",
                      title="LoRA: Low-Rank Adaptation of Large Language Models")
# Methods II (issue 8): the rest of the survey's single-task methods
METHODS.register_lazy("relora", "lorabench.methods.low_rank_bottleneck.relora:ReLoRA", family="low-rank-bottleneck", paper="2307.05695",
                      title="ReLoRA: High-Rank Training Through Low-Rank Updates")
METHODS.register_lazy("cola", "lorabench.methods.low_rank_bottleneck.cola:CoLA", family="low-rank-bottleneck", paper="2401.04151",
                      title="Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning")
METHODS.register_lazy("delta-lora", "lorabench.methods.low_rank_bottleneck.delta_lora:DeltaLoRA", family="low-rank-bottleneck", paper="2309.02411",
                      title="Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices")
METHODS.register_lazy("flora", "lorabench.methods.low_rank_bottleneck.flora:FLoRA", family="low-rank-bottleneck", paper="2402.03293",
                      title="FLoRA: Low-Rank Adapters Are Secretly Gradient Compressors")
METHODS.register_lazy("melora", "lorabench.methods.low_rank_bottleneck.melora:MELoRA", family="low-rank-bottleneck", paper="2402.17263",
                      title="MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("mora", "lorabench.methods.low_rank_bottleneck.mora:MoRA", family="low-rank-bottleneck", paper="2405.12130",
                      title="MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("lora-dropout", "lorabench.methods.learning_procedure.lora_dropout:LoraDropout", family="learning-procedure", paper="2404.09610",
                      title="LoRA Dropout as a Sparsity Regularizer for Overfitting Control")
METHODS.register_lazy("sibo", "lorabench.methods.learning_procedure.sibo:SIBO", family="learning-procedure", paper="2402.11896",
                      title="SIBO: A Simple Booster for Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("lora-sp", "lorabench.methods.efficiency_freezing_sharing.lora_sp:LoraSP", family="efficiency-freezing-sharing", paper="2403.08822",
                      title="LoRA-SP: Streamlined Partial Parameter Adaptation for Resource-Efficient Fine-Tuning of LLMs")
METHODS.register_lazy("aflora", "lorabench.methods.efficiency_freezing_sharing.aflora:AFLoRA", family="efficiency-freezing-sharing", paper="2403.13269",
                      title="AFLoRA: Adaptive Freezing of Low Rank Adaptation in Parameter Efficient Fine-Tuning")
METHODS.register_lazy("dropbp", "lorabench.methods.efficiency_freezing_sharing.dropbp:DropBP", family="efficiency-freezing-sharing", paper="2402.17812",
                      title="DropBP: Accelerating Fine-Tuning of Large Language Models by Dropping Backward Propagation")
METHODS.register_lazy("lte", "lorabench.methods.low_rank_bottleneck.lte:LTE", family="low-rank-bottleneck", paper="2402.16828",
                      title="Training Neural Networks from Scratch with Parallel Low-Rank Adapters (LoRA-the-Explorer)")
METHODS.register_lazy("reslora", "lorabench.methods.learning_procedure.reslora:ResLoRA", family="learning-procedure", paper="2402.18039",
                      title="ResLoRA: Identity Residual Mapping in Low-Rank Adaption")
METHODS.register_lazy("laplace-lora", "lorabench.methods.combining.laplace_lora:LaplaceLoRA", family="combining", paper="2308.13111",
                      title="Bayesian Low-rank Adaptation for Large Language Models (Laplace-LoRA)")
METHODS.register_lazy("hiddenkey", "lorabench.methods.learning_procedure.hiddenkey:HiddenKey", family="learning-procedure", paper="2403.00812",
                      title="LoRA Meets Dropout under a Unified Framework (HiddenKey)")
METHODS.register_lazy("lora-drop", "lorabench.methods.efficiency_pruning.lora_drop:LoraDrop", family="efficiency-pruning", paper="2402.07721",
                      title="LoRA-Drop: Efficient LoRA Parameter Pruning based on Output Evaluation")
METHODS.register_lazy("bilora", "lorabench.methods.learning_procedure.bilora:BiLoRA", family="learning-procedure", paper="2403.13037",
                      title="BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank Adaptation")
METHODS.register_lazy("autolora", "lorabench.methods.dynamic_rank.autolora:AutoLoRA", family="dynamic-rank", paper="2403.09113",
                      title="AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on Meta Learning")
METHODS.register_lazy("star", "lorabench.methods.combining.star:STAR", family="combining", paper="2403.01165",
                      title="STAR: Constraint LoRA with Dynamic Active Learning for Data-Efficient Fine-Tuning of Large Language Models")
METHODS.register_lazy("salora", "lorabench.methods.dynamic_rank.salora:SaLoRA", family="dynamic-rank", paper="doi:10.3390/math11204317",
                      title="SaLoRA: Structure-Aware Low-Rank Adaptation for Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("increlora", "lorabench.methods.dynamic_rank.increlora:IncreLoRA", family="dynamic-rank", paper="2308.12043",
                      title="IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning")
METHODS.register_lazy("loraprune", "lorabench.methods.efficiency_pruning.loraprune:LoraPrune", family="efficiency-pruning", paper="2305.18403",
                      title="LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("lorashear", "lorabench.methods.efficiency_pruning.lorashear:LoraShear", family="efficiency-pruning", paper="2310.18356",
                      title="LoRAShear: Efficient Large Language Model Structured Pruning and Knowledge Recovery")
METHODS.register_lazy("lora-layer-pruning", "lorabench.methods.efficiency_pruning.lora_layer_pruning:LayerPruningLoRA", family="efficiency-pruning", paper="2305.08285",
                      title="Parameter-Efficient Fine-Tuning with Layer Pruning on Free-Text Sequence-to-Sequence Modeling")
METHODS.register_lazy("alora", "lorabench.methods.dynamic_rank.alora:ALoRA", family="dynamic-rank", paper="2403.16187",
                      title="ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models")
METHODS.register_lazy("longlora", "lorabench.methods.beyond_fine_tuning.longlora:LongLoRA", family="beyond-fine-tuning", paper="2309.12307",
                      title="LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models")
METHODS.register_lazy("sinklora", "lorabench.methods.beyond_fine_tuning.sinklora:SinkLoRA", family="beyond-fine-tuning", paper="2406.05678",
                      title="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models")
# Methods I (issue 6): the core LoRA family
METHODS.register_lazy("rslora", "lorabench.methods.learning_procedure.rslora:RsLoRA", family="learning-procedure", paper="2312.03732",
                      title="rsLoRA: A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA")
METHODS.register_lazy("dora", "lorabench.methods.low_rank_bottleneck.dora:DoRA", family="low-rank-bottleneck", paper="2402.09353",
                      title="DoRA: Weight-Decomposed Low-Rank Adaptation")
METHODS.register_lazy("pissa", "lorabench.methods.learning_procedure.pissa:PiSSA", family="learning-procedure", paper="2404.02948",
                      title="PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models")
METHODS.register_lazy("milora", "lorabench.methods.learning_procedure.milora:MiLoRA", family="learning-procedure", paper="2406.09044",
                      title="MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning")
METHODS.register_lazy("lora-fa", "lorabench.methods.efficiency_freezing_sharing.lora_fa:LoRAFA", family="efficiency-freezing-sharing", paper="2308.03303",
                      title="LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning")
METHODS.register_lazy("lora-plus", "lorabench.methods.learning_procedure.lora_plus:LoRAPlus", family="learning-procedure", paper="2402.12354",
                      title="LoRA+: Efficient Low Rank Adaptation of Large Models")
METHODS.register_lazy("vera", "lorabench.methods.efficiency_freezing_sharing.vera:VeRA", family="efficiency-freezing-sharing", paper="2310.11454",
                      title="VeRA: Vector-based Random Matrix Adaptation")
METHODS.register_lazy("qlora", "lorabench.methods.efficiency_quantization.qlora:QLoRA", family="efficiency-quantization", paper="2305.14314",
                      title="QLoRA: Efficient Finetuning of Quantized LLMs")
METHODS.register_lazy("loftq", "lorabench.methods.efficiency_quantization.loftq:LoftQ", family="efficiency-quantization", paper="2310.08659",
                      title="LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models")
METHODS.register_lazy("qa-lora", "lorabench.methods.efficiency_quantization.qa_lora:QALoRA", family="efficiency-quantization", paper="2309.14717",
                      title="QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models")
METHODS.register_lazy("adalora", "lorabench.methods.dynamic_rank.adalora:AdaLoRA", family="dynamic-rank", paper="2303.10512",
                      title="AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
METHODS.register_lazy("fourierft", "lorabench.methods.efficiency_freezing_sharing.fourierft:FourierFT", family="efficiency-freezing-sharing", paper="2405.03003",
                      title="Parameter-Efficient Fine-Tuning with Discrete Fourier Transform")
METHODS.register_lazy("vb-lora", "lorabench.methods.efficiency_freezing_sharing.vb_lora:VBLoRA", family="efficiency-freezing-sharing", paper="2405.15179",
                      title="VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks")
METHODS.register_lazy("riemannian", "lorabench.methods.learning_procedure.riemannian:RiemannianLoRA", family="learning-procedure", paper="2402.02347",
                      title="Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models")
METHODS.register_lazy("lora-xs", "lorabench.methods.efficiency_freezing_sharing.lora_xs:LoRAXS", family="efficiency-freezing-sharing", paper="2405.17604",
                      title="LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters")
METHODS.register_lazy("sora", "lorabench.methods.dynamic_rank.sora:SoRA", family="dynamic-rank", paper="2311.11696",
                      title="Sparse Low-rank Adaptation of Pre-trained Language Models")
METHODS.register_lazy("dylora", "lorabench.methods.dynamic_rank.dylora:DyLoRA", family="dynamic-rank", paper="2210.07558",
                      title="DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation")
METHODS.register_lazy("dora-rank", "lorabench.methods.dynamic_rank.dora_rank:DoraRank", family="dynamic-rank", paper="2405.17357",
                      title="DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution")
# Issue 16 (part b): the survey's remaining single-task methods
METHODS.register_lazy("lora-init-b", "lorabench.methods.learning_procedure.lora_init_b:LoRAInitB", family="learning-procedure", paper="2406.08447",
                      title='The Impact of Initialization on LoRA Finetuning Dynamics')
METHODS.register_lazy("apiq", "lorabench.methods.efficiency_quantization.apiq:ApiQ", family="efficiency-quantization", paper="2402.05147",
                      title='ApiQ: Finetuning of 2-Bit Quantized Large Language Model')
METHODS.register_lazy("l4q", "lorabench.methods.efficiency_quantization.l4q:L4Q", family="efficiency-quantization", paper="2402.04902",
                      title='L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models via LoRA-wise LSQ')
METHODS.register_lazy("byom-lora", "lorabench.methods.efficiency_freezing_sharing.byom_lora:ByomLoRA", family="efficiency-freezing-sharing", paper="2310.01886",
                      title='BYOM-LoRA: Effective and Parameter-Efficient Reusing Fine-Tuned Models')
METHODS.register_lazy("pillow", "lorabench.methods.combining.pillow:Pillow", family="combining", paper="2312.05621",
                      title='PILLOW: Enhancing Efficient Instruction Fine-tuning via Prompt Matching')

# Issue 19: LoRA for federated learning, driven by the clients scenario (lorabench/harness/clients.py)
METHODS.register_lazy("fedit", "lorabench.methods.federated.fedit:FedIT", family="federated", paper="2305.05644",
                      title="Towards Building the Federated GPT: Federated Instruction Tuning")
METHODS.register_lazy("ffa-lora", "lorabench.methods.federated.ffa_lora:FFALoRA", family="federated", paper="2403.12313",
                      title="Improving LoRA in privacy-preserving federated learning")
METHODS.register_lazy("flexlora", "lorabench.methods.federated.flexlora:FlexLoRA", family="federated", paper="2402.11505",
                      title="Federated fine-tuning of large language models under heterogeneous language tasks and client resources")
METHODS.register_lazy("federa", "lorabench.methods.federated.federa:FeDeRA", family="federated", paper="2404.18848",
                      title="FeDeRA: Efficient fine-tuning of language models in federated learning leveraging weight decomposition")
METHODS.register_lazy("hetlora", "lorabench.methods.federated.hetlora:HetLoRA", family="federated", paper="2401.06432",
                      title="Heterogeneous LoRA for federated fine-tuning of on-device foundation models")
METHODS.register_lazy("slora", "lorabench.methods.federated.slora:SLoRA", family="federated", paper="2308.06522",
                      title="SLoRA: Federated parameter efficient fine-tuning of language models")
METHODS.register_lazy("pfedlora", "lorabench.methods.federated.pfedlora:PFedLoRA", family="federated", paper="2310.13283",
                      title="pFedLoRA: Model-heterogeneous personalized federated learning with LoRA tuning")
METHODS.register_lazy("fedms", "lorabench.methods.federated.fedms:FedMS", family="federated", paper="2312.15926",
                      title="FedMS: Federated learning with mixture of sparsely activated foundations models")
METHODS.register_lazy("privatelora", "lorabench.methods.federated.privatelora:PrivateLoRA", family="federated", paper="2311.14030",
                      title="PrivateLoRA for efficient privacy preserving LLM")
METHODS.register_lazy("otp-lora", "lorabench.methods.federated.otp_lora:OtpLoRA", family="federated", paper="2401.09796",
                      title="A fast, performant, secure distributed training framework for large language model")

# Issue 17: cross-task generalization, composition rules driven by the multi-task scenario (lorabench/harness/cross_task.py)
METHODS.register_lazy("lorahub", "lorabench.methods.cross_task.lorahub:LoraHub", family="cross-task", paper="2307.13269",
                      title="LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition")
METHODS.register_lazy("lora-arithmetic", "lorabench.methods.cross_task.lora_arithmetic:LoraArithmetic", family="cross-task",
                      paper="2306.14870", title="Composing Parameter-Efficient Modules with Arithmetic Operations")
METHODS.register_lazy("uniform-average", "lorabench.methods.cross_task.uniform_average:UniformAverage", family="cross-task",
                      paper="2203.05482", title="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time (the uniform soup, of task adapters)")
METHODS.register_lazy("loraretriever", "lorabench.methods.cross_task.loraretriever:LoraRetriever", family="cross-task",
                      paper="2402.09997", title="LoraRetriever: Input-Aware LoRA Retrieval and Composition for Mixed Tasks in the Wild")
METHODS.register_lazy("token-level", "lorabench.methods.cross_task.token_level:TokenLevel", family="cross-task",
                      paper="2311.10847", title="Token-level adaptation of LoRA adapters for downstream task generalization")
METHODS.register_lazy("compeft", "lorabench.methods.cross_task.compeft:ComPEFT", family="cross-task", paper="2311.13171",
                      title="ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization")
METHODS.register_lazy("l-lora", "lorabench.methods.cross_task.l_lora:LLoRA", family="cross-task", paper="2310.04742",
                      title="L-LoRA: Parameter efficient multi-task model fusion with partial linearization")
# ... reusing every task's own adapter (the reuse protocol, lorabench/harness/reuse.py)
METHODS.register_lazy("peru-lora", "lorabench.methods.cross_task.peru_lora:PeruLoRA", family="cross-task", paper="2310.01886",
                      title="Effective and parameter-efficient reusing fine-tuned models: PERU-LoRA, a merged model plus each task's rank-q LoRA update")
# ... and mixtures of LoRA experts, configurations of one layer (lorabench/methods/cross_task/mixture.py), trained by
# the multi-task scenario's protocol (b) (lorabench/harness/mixture.py)
METHODS.register_lazy("mixlora", "lorabench.methods.cross_task.mixlora:MixLoRA", family="cross-task", paper="2404.15159",
                      title="MixLoRA (Li et al.): Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts")
METHODS.register_lazy("loramoe", "lorabench.methods.cross_task.loramoe:LoRAMoE", family="cross-task", paper="2312.09979",
                      title="LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin")
METHODS.register_lazy("moelora", "lorabench.methods.cross_task.moelora:MOELoRA", family="cross-task", paper="2310.18339",
                      title="MOELoRA: An MoE-based Parameter Efficient Fine-Tuning Method for Multi-task Medical Applications")
METHODS.register_lazy("sira", "lorabench.methods.cross_task.sira:SiRA", family="cross-task", paper="2311.09179",
                      title="SiRA: Sparse Mixture of Low Rank Adaptation")
METHODS.register_lazy("mola", "lorabench.methods.cross_task.mola:MoLA", family="cross-task", paper="2402.08562",
                      title="MoLA: Higher Layers Need More LoRA Experts")
METHODS.register_lazy("multilora", "lorabench.methods.cross_task.multilora:MultiLoRA", family="cross-task", paper="2311.11501",
                      title="MultiLoRA: Democratizing LoRA for Better Multi-Task Learning")
METHODS.register_lazy("llava-mole", "lorabench.methods.cross_task.llava_mole:LLaVAMoLE", family="cross-task", paper="2401.16160",
                      title="LLaVA-MoLE: Sparse Mixture of LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs")
METHODS.register_lazy("mtlora", "lorabench.methods.cross_task.mtlora:MTLoRA", family="cross-task", paper="2403.20320",
                      title="MTLoRA: Low-rank adaptation approach for efficient multi-task learning")
METHODS.register_lazy("mixture-of-loras", "lorabench.methods.cross_task.mixture_of_loras:MixtureOfLoras", family="cross-task",
                      paper="2403.03432", title="Mixture-of-LoRAs: An efficient multitask tuning method for large language models")
METHODS.register_lazy("octavius", "lorabench.methods.cross_task.octavius:Octavius", family="cross-task", paper="2311.02684",
                      title="Octavius: Mitigating Task Interference in MLLMs via LoRA-MoE")
METHODS.register_lazy("mixlora-cfs", "lorabench.methods.cross_task.mixlora_cfs:MixLoRACFS", family="cross-task", paper="2402.15896",
                      title="MixLoRA: Multimodal instruction tuning with conditional mixture of LoRA")
METHODS.register_lazy("mocle", "lorabench.methods.cross_task.mocle:MoCLE", family="cross-task", paper="2312.12379",
                      title="MoCLE: Mixture of cluster-conditional LoRA experts for vision-language instruction tuning")
METHODS.register_lazy("fast-lora", "lorabench.methods.cross_task.fast_lora:FastLoRA", family="cross-task", paper="2312.05677",
                      title="Fast LoRA: Batched low-rank adaptation of foundation models")
METHODS.register_lazy("moral", "lorabench.methods.cross_task.moral:MoRAL", family="cross-task", paper="2402.11260",
                      title="MoRAL: MoE augmented LoRA for LLMs' lifelong learning")
METHODS.register_lazy("mlore", "lorabench.methods.cross_task.mlore:MLoRE", family="cross-task", paper="2403.17749",
                      title="MLoRE: Multi-task dense prediction via mixture of low-rank experts")
METHODS.register_lazy("x-lora", "lorabench.methods.cross_task.x_lora:XLoRA", family="cross-task", paper="2402.07148",
                      title="X-LoRA: Mixture of low-rank adapter experts, a flexible framework for large language models with applications in protein mechanics and design")
# ... composition of outputs: M LoRAs from different seeds, trained and scored by protocol (b)
METHODS.register_lazy("lora-ensemble", "lorabench.methods.cross_task.lora_ensemble:LoraEnsemble", family="cross-task",
                      paper="2310.00035", title="LoRA ensembles for large language model fine-tuning")


def get_method(name: str):
    """The Method class registered as `name` (UserError with did-you-mean otherwise)."""
    return METHODS.get(name)

# Issue 18: LoRA for continual learning, driven by the sequence scenario (lorabench/harness/sequence.py)
METHODS.register_lazy("seq-lora", "lorabench.methods.continual.seq_lora:SeqLoRA", family="continual", paper="1706.08840",
                      title="Sequential LoRA: one adapter fine-tuned on each task in turn (the forgetting reference)")
METHODS.register_lazy("per-task-lora", "lorabench.methods.continual.per_task_lora:PerTaskLoRA", family="continual", paper="1706.08840",
                      title="A new LoRA per task, the task known at test time (the upper reference)")
METHODS.register_lazy("replay-lora", "lorabench.methods.continual.replay_lora:ReplayLoRA", family="continual", paper="1902.10486",
                      title="Experience replay with a small episodic memory, one LoRA adapter")
METHODS.register_lazy("multitask-lora", "lorabench.methods.continual.multitask_lora:MultitaskLoRA", family="continual", paper="2310.14152",
                      title="Multi-task LoRA: one adapter trained jointly on every task seen so far (the joint reference)")
METHODS.register_lazy("o-lora", "lorabench.methods.continual.o_lora:OLoRA", family="continual", paper="2310.14152",
                      title="Orthogonal Subspace Learning for Language Model Continual Learning (O-LoRA)")
METHODS.register_lazy("inflora", "lorabench.methods.continual.inflora:InfLoRA", family="continual", paper="2404.00228",
                      title="InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning")
METHODS.register_lazy("i-lora", "lorabench.methods.continual.i_lora:ILoRA", family="continual", paper="2402.18865",
                      title="I-LoRA: Analyzing and Reducing Catastrophic Forgetting in Parameter-Efficient Tuning")
METHODS.register_lazy("task-arithmetic", "lorabench.methods.continual.task_arithmetic:TaskArithmetic", family="continual",
                      paper="2311.02428", title="Task Arithmetic with LoRA for Continual Learning")
METHODS.register_lazy("gs-lora", "lorabench.methods.continual.gs_lora:GSLoRA", family="continual", paper="2403.11530",
                      title="Continual Forgetting for Pre-trained Vision Models (GS-LoRA)")
METHODS.register_lazy("moral-cl", "lorabench.methods.continual.moral_cl:MoRALCL", family="continual", paper="2402.11260",
                      title="MoRAL: MoE augmented LoRA for LLMs' lifelong learning (one mixture trained task after task)")
