"""How far each mirrored pair may drift from statement-by-statement alignment, and why.

The ONE table to update when a twin changes. A pair's drift is the number of rows the
alignment (`parity.explain.align`) cannot explain: statements that differ with no known idiom,
or stand on one side alone. A pair missing here must line up exactly (drift 0). Each entry
carries one line saying which framework difference forces the rest; tests/parity/
test_explain_alignment.py fails, naming the pair and its rows, when a pair drifts past its bound.
`python -m parity.explain` prints every pair's figures next to its allowance.

"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALLOWANCES", "Allowance"]


@dataclass(frozen=True)
class Allowance:
    """At most `rows` unexplained rows, for `reason` (one line)."""

    rows: int
    reason: str


# Reasons shared by several pairs.
STATE = ("torch's state_dict keys are the HF names and tensors are copied in place; NNX parameters are "
         "Variables in a state tree, found by path (weights.names) and set functionally")
IMMUTABLE_CACHE = ("JAX arrays are immutable: the cache is a pytree replaced by `.replace`, written with "
                   "dynamic_update_slice at a possibly traced length; torch writes its buffers in place")
JIT_LOOP = ("Flax generation is one jitted program: lax.while_loop with cond/body functions over immutable "
            "records; torch loops eagerly and writes its records in place")
NNX_BUILD = ("NNX layers are built with rngs, param_dtype and an initializer in one call; torch builds on the "
             "meta device, allocates, then draws in place (once)")
TRACED = "under jit JAX values are tracers: the Flax twin cannot branch on them and checks what it can"
VQ_RNG = ("JAX randomness is explicit keys folded per block/layer; torch uses one stateful generator, and the "
          "Flax twin scans blocks with lax.scan under jit where torch loops")
TRAIN_MODE = ("train/eval: a torch module carries `training` (set by train()/eval()); an NNX module holds a "
              "`deterministic` attribute that its train()/eval() set")
SERVING = ("the Flax runner compiles every program (a prefill per row count and pad bucket, a decode step per row "
           "count and key bucket) ahead of time, runs each once, and calls them on numpy inputs, padding the admitted rows to a compiled row count; "
           "the torch runner runs the model eagerly on its device, on exactly the admitted rows, writes the slots' "
           "cache rows in place and decodes on a view of the buffers' first rows and positions")

ALLOWANCES: dict[str, Allowance] = {
    # checkpoint.py: the two frameworks' parameter containers
    "checkpoint.py:state_to_numpy": Allowance(7, STATE),
    "checkpoint.py:load_numpy_state": Allowance(11, STATE),
    "checkpoint.py:load_checkpoint": Allowance(11, STATE + "; a torch parameter off the CPU is filled block by "
                                                       "block through a host buffer, a JAX array is put on its device"),
    "checkpoint.py:load_module": Allowance(5, "torch gives a meta-built module memory (to_empty) and copies into "
                                              "each parameter in place; NNX parameters, abstract or not, are "
                                              "replaced by the loaded arrays, kernels transposed"),
    "checkpoint.py:from_pretrained": Allowance(34, "torch builds on the meta device then to_empty(device); NNX builds "
                                                   "an abstract model with nnx.eval_shape, merges the loaded state, "
                                                   "and resolves its dots' precision for the device; with a mesh "
                                                   "torch cuts the meta model, NNX reads slices per device"),
    "checkpoint.py:save_pretrained": Allowance(10, STATE + "; a model spread over processes is saved by every "
                                                          "process (_save_sharded): torch sees DTensors, JAX "
                                                          "several processes"),
    "checkpoint.py:_save_sharded": Allowance(16, "the collectives are each framework's: torch.distributed's "
                                                 "DTensor.full_tensor and barrier, JAX's process_allgather and "
                                                 "sync_global_devices; NNX kernels are transposed back to HF's [out, in]"),
    "checkpoint.py:_save_pieces": Allowance(33, "a torch rank holds one piece per tensor (its DTensor's local "
                                                "slice, from the placements), deduplicated over ranks by "
                                                "all_gather_object; a JAX process several (its devices' "
                                                "addressable_shards, replica 0 each), exchanged as JSON bytes"),
    # generation.py
    "generation.py:top_k": Allowance(10, "jax.lax.top_k breaks ties by index; torch.topk's tie order is "
                                         "unspecified, so rows with ties at the k-th value are re-ranked by index"),
    "generation.py:choose": Allowance(3, JIT_LOOP),
    "generation.py:decode": Allowance(13, JIT_LOOP + "; torch's loop may run its step compiled (torch.compile, "
                                              "CUDA graphs) on a cache kept at fixed addresses"),
    "generation.py:write_step": Allowance(2, JIT_LOOP),
    "generation.py:beam_step": Allowance(1, "int32 indices under JAX need an explicit dtype on arange"),
    "generation.py:beam_search": Allowance(15, JIT_LOOP + "; torch gathers the cache rows (keys, values, per-row "
                                                          "length) by parent in place"),
    "generation.py:generate_records": Allowance(2, "torch's cache takes the embedding weight's dtype (a module may be "
                                                   "cast with .to), NNX's Embed carries its compute dtype; the used "
                                                   "length is a Python int in torch, a traced scalar under jit"),
    "generation.py:generate": Allowance(22, "Flax pads prompts to a length bucket and runs one jax.jit program; "
                                            "torch moves inputs to the model's device and runs eagerly, or with "
                                            "its decode step compiled (`compile`)"),
    # heads.py
    "heads.py:sequence_classification_loss": Allowance(2, "integer labels: torch compares dtypes and needs int64 "
                                                          "targets, JAX asks issubdtype"),
    "heads.py:ForCausalLM.logits": Allowance(1, "the tied table: torch's Embedding holds `weight`, NNX's Embed "
                                                "holds `embedding`, a Variable read with [...]"),
    # layers/
    "layers/dropout.py:stream_key": Allowance(1, "torch puts each folded int on the key's device (as_tensor); JAX "
                                                 "arrays follow the computation"),
    "layers/dropout.py:keep_mask": Allowance(5, "eager torch runs each op of the hash as a pass over memory, so on "
                                                "CPU it hashes blocks of rows that stay in cache into a preallocated "
                                                "mask; XLA fuses the hash into one loop"),
    "layers/dropout.py:Dropout.__init__": Allowance(2, TRAIN_MODE),
    "layers/dropout.py:Dropout.__call__": Allowance(1, TRAIN_MODE),
    "layers/attention.py:KVCache.init": Allowance(1, "the Flax cache is a pytree with a traced int32 length; "
                                                     "torch keeps lists and a Python int"),
    "layers/attention.py:concrete_int": Allowance(5, "JAX raises on reading a traced value; torch.compile says it "
                                                     "is tracing (torch.compiler.is_compiling)"),
    "layers/attention.py:KVCache.key_length": Allowance(1, TRACED),
    "layers/attention.py:KVCache.update": Allowance(14, IMMUTABLE_CACHE + "; each row at its own index: torch by "
                                                                          "advanced indexing, Flax by a vmapped "
                                                                          "dynamic_update_slice"),
    "layers/attention.py:KVCache.advance": Allowance(2, IMMUTABLE_CACHE),
    "layers/linear.py:Linear.__call__": Allowance(5, "torch's F.linear takes the [out, in] weight and adds the bias in "
                                                     "the same BLAS call; XLA's dot takes the [in, out] kernel and a "
                                                     "precision, the bias added after; a pack is MKL's packed GEMM in "
                                                     "torch, a dot on the [out, in] copy in XLA, which a traced NNX "
                                                     "layer (a copy of the module) finds through generate()"),
    "layers/linear.py:Linear.packed_for": Allowance(5, "torch skips packs under autograd and torch.compile and stamps a "
                                                       "weight by address and version; JAX arrays are immutable, so an "
                                                       "unchanged kernel is the same array, and traced (jit, grad) only "
                                                       "the packs generate() checked and passed in apply"),
    "layers/linear.py:prepack_linears": Allowance(12, "torch walks model.modules() and keeps packs on the module, made by "
                                                      "MKL for every row count; NNX walks nnx.iter_graph and keeps them "
                                                      "beside it (its state stays its parameters): one [out, in] copy "
                                                      "of the kernel for every row count, checked by array identity, "
                                                      "none for MoE experts (the Flax MoE multiplies them stacked)"),
    "layers/linear.py:linear": Allowance(6, NNX_BUILD),
    "layers/attention.py:attention_fast": Allowance(3, "torch's fused attention takes an additive mask (a boolean one "
                                                       "gives padding queries NaN) and a GQA flag; jax's takes "
                                                       "[B, T, H, D] and the boolean mask, and groups heads itself"),
    "layers/attention.py:Attention.__call__": Allowance(1, "a torch tensor-parallel rank computes only its heads' "
                                                           "attention map and draws their dropout masks at their "
                                                           "places among all heads (_attention_dropout); a Flax "
                                                           "map is global"),
    "layers/attention.py:set_attn_implementation": Allowance(1, "torch walks model.modules(), NNX nnx.iter_graph"),
    "layers/moe.py:load_balancing_loss": Allowance(1, "torch expand+reshape against jnp.tile for the same "
                                                      "per-layer mask repeat"),
    "layers/moe.py:SparseMoeBlock.dense_experts": Allowance(2, "the experts' weights stacked in each framework's "
                                                               "layout (torch [X, out, in], NNX kernels [X, in, out]): "
                                                               "the einsum subscripts differ"),
    "layers/moe.py:SparseMoeBlock.sparse_experts": Allowance(17, "jit needs static shapes: the Flax fast path sorts the "
                                                                 "(token, expert) rows by expert and runs grouped "
                                                                 "products (ragged_dot); torch loops over experts on "
                                                                 "their own tokens, as HF does"),
    "layers/moe.py:set_moe_dispatch": Allowance(1, "module traversal: Module.modules() against nnx.iter_modules "
                                                   "(path, module) pairs"),
    "layers/precision.py:matmul_settings": Allowance(3, "torch's switches are attributes read one by one (two APIs "
                                                        "that must not be mixed); JAX's is one config value"),
    "layers/precision.py:matmul_precision": Allowance(6, "torch's float32 matmul switches are process-wide attributes, "
                                                         "saved and restored by hand; JAX has a context manager"),
    "layers/rope.py:RotaryEmbedding.__init__": Allowance(1, "torch.compile folds the rotary tables into its graph "
                                                             "by a number standing for the config (a frozen "
                                                             "dataclass it cannot hold as a constant)"),
    "layers/rope.py:RotaryEmbedding.inv_freq": Allowance(11, "dynamic NTK under jit: the length is traced, so the "
                                                             "numpy frequencies run as a pure_callback"),
    "model.py:make_attention_mask": Allowance(5, TRACED),
    "model.py:check_token_ids": Allowance(1, TRACED),
    "model.py:DecoderLayer.__init__": Allowance(5, NNX_BUILD),
    "model.py:DecoderModel.__init__": Allowance(5, NNX_BUILD + "; the pad row is zeroed with .at[].set"),
    "model.py:DecoderModel.embed": Allowance(5, "torch's Embedding(padding_idx) keeps the pad row's gradient at zero; "
                                                "NNX's Embed has no padding_idx, so stop_gradient does it"),
    "model.py:DecoderModel.__call__": Allowance(7, "remat: torch.utils.checkpoint wraps the layer call and runs only "
                                                   "while autograd records; nnx.remat wraps the layer's __call__ and "
                                                   "JAX decides under grad; scan_layers (Flax only): XLA compiles one "
                                                   "layer scanned over stacked parameters, where torch loops eagerly"),
    # sharding.py: the frameworks' own engines, fed the same table
    "sharding.py:param_shardings": Allowance(14, "NNX kernels are [in, out]: the table's HF-layout axes are reversed "
                                                 "into NamedShardings (on a mesh of Auto axes); torch's names and "
                                                 "shapes are HF's already"),
    "sharding.py:process_count": Allowance(2, "a JAX mesh spans devices of several processes; a torch DeviceMesh "
                                              "has one rank per process"),
    "sharding.py:shard_model": Allowance(24, "JAX device_puts each parameter on its NamedSharding and jit does the "
                                             "rest; torch hands the plan to parallelize_module and fully_shard (and "
                                             "gathers a tied head's vocab-parallel logits, which no style covers)"),
    "sharding.py:local_kv_heads": Allowance(13, "a sharded JAX array is one global array (every head, GSPMD places "
                                                "them); a torch rank under tensor parallelism computes its share of "
                                                "the kv heads, read from the k projection's DTensor placement"),
    "sharding.py:constrain_activations": Allowance(6, "JAX SPMD takes a sharding constraint at the layer boundary; "
                                                      "torch's parallel styles fix layouts at module boundaries"),
    # training.py
    "training.py:learning_rate_schedule": Allowance(9, "optax needs the schedule as a traceable jnp function of the "
                                                       "step count; torch's LambdaLR calls the shared Python "
                                                       "specification (weights.shared.training.lr_factor) itself"),
    "training.py:Optimizer.__init__": Allowance(6, "torch.optim takes parameter groups (decay, no decay) and a "
                                                   "separate LambdaLR; optax one transformation with a decay mask "
                                                   "and the schedule, nnx.Optimizer counting the steps"),
    "training.py:Optimizer.learning_rate": Allowance(2, "torch's scheduler holds the current rate; optax's is the "
                                                        "schedule at nnx.Optimizer's step count"),
    "training.py:split_batch": Allowance(2, "torch loops over a list of micro-batches; the Flax step scans them, "
                                            "stacked on a new leading axis"),
    "training.py:_problem_type": Allowance(1, "integer labels: torch compares dtypes, JAX asks issubdtype"),
    "training.py:clip_grad_norm": Allowance(8, "torch scales each parameter's .grad in place; JAX returns the scaled "
                                               "gradient pytree"),
    "training.py:_train_step": Allowance(28, "torch accumulates each micro-batch's gradients into .grad with "
                                             "backward() in a Python loop and clips the parameters' .grad; the "
                                             "Flax step is one jitted program scanning the micro-batches "
                                             "(lax.scan) with functional gradients of the nnx.split parameters; "
                                             "a torch data-parallel rank holds only its rows: it offsets its "
                                             "dropout masks by its first global row, sums the label counts and "
                                             "the loss over the ranks and weighs its labels by their number, as "
                                             "FSDP2 averages gradients (a Flax batch is global)"),
    # serving.py
    "serving.py:sample_rows": Allowance(11, "torch skips the top-k/top-p filters, the allowed-token mask, the "
                                            "sampling scan and the filtered distribution eagerly when no row uses "
                                            "them (each a chain of eager kernels over [R, V]); under jit Flax "
                                            "chooses with lax.cond, and XLA fuses the mask into passes it makes "
                                            "anyway"),
    "serving.py:Runner.__init__": Allowance(17, SERVING + "; with scanned layers (Flax only: scan_layers) the Flax "
                                                          "runner holds the layers' variables, to remake their "
                                                          "parameter stack when the weights change, and with packed "
                                                          "linears the layers and kernels the copies were made from "
                                                          "(torch reads its packs at every call)"),
    "serving.py:Runner._settings": Allowance(2, SERVING),
    "serving.py:Runner.prefill": Allowance(15, SERVING),
    "serving.py:Runner.decode": Allowance(9, SERVING),
    # vq/
    "vq/attention.py:VQAttention.__init__": Allowance(2, NNX_BUILD),
    "vq/attention.py:tree_detach": Allowance(6, "a pytree map with stop_gradient in JAX; torch walks dicts and "
                                                "lists by hand"),
    "vq/checkpoint.py:abstract_model": Allowance(1, "torch's meta device against nnx.eval_shape"),
    "vq/checkpoint.py:to_numpy": Allowance(6, STATE),
    "vq/checkpoint.py:load_numpy": Allowance(7, STATE),
    "vq/common.py:linear": Allowance(2, "F.linear takes [out, in] weights; JAX multiplies by the [in, out] kernel"),
    "vq/common.py:dropout_mask": Allowance(2, VQ_RNG),
    "vq/embeddings.py:Embeddings.__call__": Allowance(1, "torch indexes with int64, jnp.take with int32"),
    "vq/layer.py:TransformerLayer._sublayer": Allowance(16, VQ_RNG),
    "vq/layer.py:TransformerLayer.__call__": Allowance(2, VQ_RNG),
    "vq/model.py:Transformer.__call__": Allowance(2, VQ_RNG),
    "vq/norm.py:LayerNorm.__call__": Allowance(1, "optional NNX variables are read with [...] only when present"),
    "vq/position.py:ScaledSin.__call__": Allowance(3, "the NNX scale is a Variable read once with [...]"),
    "vq/quantizer.py:get_codewords": Allowance(1, "one gather, two names (take_along_dim / take_along_axis); torch "
                                                  "indexes with int64"),
    "vq/quantizer.py:one_hot": Allowance(1, "torch's one_hot needs int64 and an extra class for the padding code; "
                                            "JAX's drops out-of-range codes"),
    "vq/sampling.py:sample": Allowance(7, "the Flax step is compiled once (nnx.jit) and reused; torch calls the model "
                                          "eagerly"),
    "vq/train.py:make_optimizer": Allowance(4, "optax multi_transform over parameter labels against two torch "
                                               "optimizers over parameter lists"),
    "vq/train.py:train_step": Allowance(3, "nnx.value_and_grad + optimizer.update in one jitted step against "
                                           "backward/step; JAX keys folded per chunk"),
}
