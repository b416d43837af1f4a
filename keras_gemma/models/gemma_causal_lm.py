"""Gemma for causal language modelling: the backbone and its tied logits."""

import re

import keras
from keras import ops
from keras_hub.models import CausalLM

from keras_gemma import backend
from keras_gemma import chat
from keras_gemma import distribution
from keras_gemma import generation
from keras_gemma import training as chunked_training
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_backbone import collections_frozen
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor


def check_vocabulary_fits(preprocessor, vocabulary_size):
    """A `ValueError` if the preprocessor's tokenizer makes ids the embedding
    has no row for (fewer pieces than rows is fine: the released Gemma 1 and
    2 checkpoints pad theirs)."""
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None or tokenizer.proto is None:
        return  # no vocabulary yet (from_config: the assets load afterwards)
    pieces = tokenizer.vocabulary_size()
    if pieces > vocabulary_size:
        raise ValueError(
            f"The tokenizer has {pieces} pieces, but the model's embedding has "
            f"{vocabulary_size} rows: ids {vocabulary_size} and up would have no embedding. "
            "Is the tokenizer of another model?"
        )


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(CausalLM):
    """A Gemma backbone with the tied output projection: next-token logits.

    Calling the model gives float32 logits `(batch, seq, vocabulary_size)`.
    `generate()` decodes with a preallocated key/value cache, compiled once
    per prompt-length bucket, using the sampler given to `compile()`
    (greedy by default; any `keras_hub.samplers` sampler works). With a
    preprocessor attached, `generate`, `fit`, `predict` and `evaluate` take
    strings. `fit` with the default `compile()` computes the loss from the
    final hidden states in chunks of tokens (`keras_gemma.training`).

    Args:
        backbone: a `keras_gemma.GemmaBackbone`.
        preprocessor: a `keras_gemma.GemmaCausalLMPreprocessor` or `None`.

    Example:
    ```python
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/checkpoint")
    gemma_lm.generate("The capital of France is", max_length=32)
    gemma_lm.generate(["Two", "prompts"], max_length=32, strip_prompt=True)

    gemma_lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=1))
    gemma_lm.generate("Once upon a time", max_length=64)

    gemma_lm.fit(["Some text to learn.", "More text."], batch_size=2)
    ```
    """

    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        check_vocabulary_fits(preprocessor, backbone.vocabulary_size)
        self.backbone = backbone
        self.preprocessor = preprocessor
        # Set before keras-hub's constructor, which compiles the model.
        self._objective = None  # the chunked training of compile(), if any
        self._stream_functions = None
        inputs = backbone.input
        outputs = backbone.logits(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds the model, with its tokenizer, from a preset: keras-hub's
        preset names (`"gemma_2b_en"`), `kaggle://` and `hf://` handles, a
        directory written by `save_to_preset` (keras_gemma's or keras-hub's),
        a Hugging Face Transformers directory, an official Flax / orbax
        checkpoint, a `.gguf` file (see `GemmaBackbone.from_preset`). `kwargs`:
        for example `dtype="bfloat16"`, or `preprocessor=None`.

        Example:
        ```python
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("hf://google/gemma-3-1b-it")
        ```
        """
        from keras_gemma import convert

        return convert.from_preset(cls, preset, super().from_preset, load_weights=load_weights, **kwargs)

    def call(self, inputs, training=None):
        hidden_states = self.backbone(inputs, training=training)
        if training and self._trains_on_hidden_states():
            # The compiled ChunkedCrossEntropy computes the logits in chunks.
            return hidden_states
        return self.backbone.logits(hidden_states)

    def _trains_on_hidden_states(self):
        """Whether fit takes the chunked route (see `keras_gemma.training`)."""
        return self._objective is not None and self._objective.applies(self.backbone)

    # === Training ===

    def compile(
        self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="greedy", **kwargs
    ):
        """keras-hub's `CausalLM.compile`; the default loss and metric train
        with `keras_gemma.training`'s chunked cross-entropy."""
        loss, weighted_metrics, self._objective = chunked_training.objective(
            loss, weighted_metrics, kwargs
        )
        kwargs["jit_compile"] = backend.training_jit_compile(kwargs.get("jit_compile", "auto"))
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        self._stream_functions = None

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and self._objective is not None and self._objective.accuracy:
            metrics.append(self._objective.accuracy)
        return metrics

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss. In fit, with the chunked objective, `y_pred`
        holds the final hidden states (see `call`), and loss and accuracy
        come from `ChunkedCrossEntropy.from_hidden_states`."""
        if training and self._trains_on_hidden_states():
            loss = self._objective.loss_from_hidden_states(self.backbone, y_pred, y, sample_weight)
            extra = [ops.sum(ops.cast(term, "float32")) for term in self.losses]
            return loss + ops.sum(extra) if extra else loss
        if self._objective is not None:
            self._objective.update_accuracy(y, y_pred, sample_weight)
        return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and self._objective is not None and self._objective.accuracy:
            # Keras holds no weighted metric (the accuracy is the model's own).
            config["weighted_metrics"] = keras.saving.serialize_keras_object(
                [self._objective.accuracy]
            )
        return config

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.fit` on the preprocessor's inputs (strings, `tf.data`)
        or preprocessed tensors, as in keras-hub; or on conversations (lists
        of `{"role", "content"}` messages), with the loss only on the model's
        replies (`GemmaCausalLMPreprocessor.preprocess_conversations`)."""
        if chat.is_conversations(x):
            x, y, sample_weight = chat.conversation_data(self, x, y, sample_weight)
            # Already packed: skip the string pipeline of keras-hub's fit.
            return keras.Model.fit(
                self, x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
            )
        return super().fit(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize` (Keras' `filters`) over the layers that have
        weights and a `quantize` of their own: Keras would refuse the model for
        the preprocessor's unbuilt tokenizer and warn for each norm; and
        without a full garbage collection per kernel (`collections_frozen`)."""

        def network_only(layer):
            if not layer.weights or type(layer).quantize is keras.layers.Layer.quantize:
                return False
            if mode in ("gptq", "awq") and isinstance(layer, keras.layers.Embedding):
                return False  # Keras has no GPTQ / AWQ embedding (keras-hub's stays float too, with a warning)
            if filters is None:
                return True
            if callable(filters):
                return filters(layer)
            patterns = [filters] if isinstance(filters, str) else filters
            return any(re.search(pattern, layer.name) for pattern in patterns)

        if mode == "int4":
            distribution.check_int4_layouts(self.backbone)
        with collections_frozen():
            super().quantize(mode, config=config, filters=network_only, **kwargs)
        self.generate_function = None
        self._stream_functions = None

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' `load_weights`, which also reads the `.weights.h5` files
        keras-hub's Gemma models write (see `GemmaBackbone.load_weights`)."""
        from keras_gemma.convert import keras_hub_format

        if not keras_hub_format.load_if_keras_hub_weights(self.backbone, filepath, skip_mismatch, kwargs):
            super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def export_to_keras_hub(self, preset_dir, max_shard_size=10):
        """Saves this model as a preset keras-hub's own `from_preset` loads:
        its `GemmaCausalLM` or `Gemma3CausalLM` (text), kernels in its layout,
        with the preprocessor's tokenizer. `save_to_preset` keeps
        keras_gemma's layout, which loads here without conversion;
        keras_gemma reads both.

        Args:
            preset_dir: the directory to write.
            max_shard_size: GB per weights file (keras-hub's `save_to_preset`).

        Example:
        ```python
        gemma_lm.export_to_keras_hub("gemma_for_keras_hub")
        keras_hub.models.CausalLM.from_preset("gemma_for_keras_hub")
        ```
        """
        from keras_gemma.convert import keras_hub_format

        keras_hub_format.export(self, preset_dir, max_shard_size)

    def export_to_transformers(self, path, max_shard_size="5GB", dtype=None):
        """Saves this model as a Hugging Face Transformers checkpoint that
        `AutoModelForCausalLM.from_pretrained(path)` loads (and vLLM, SGLang
        or TGI serve): `config.json` (`gemma`, `gemma2` or `gemma3_text`),
        safetensors shards with their index, and the preprocessor's
        tokenizer (`tokenizer.model` and its configs).

        Args:
            path: the directory to write.
            max_shard_size: the largest weights file, in bytes or as a string
                such as `"5GB"` (as transformers' `save_pretrained`).
            dtype: the dtype of the saved tensors (`"float32"`, `"bfloat16"`,
                `"float16"`); by default the backbone's variable dtype.

        Example:
        ```python
        gemma_lm.export_to_transformers("gemma_hf")
        transformers.AutoModelForCausalLM.from_pretrained("gemma_hf")
        ```
        """
        from keras_gemma.convert import transformers_export

        tokenizer = None if self.preprocessor is None else self.preprocessor.tokenizer
        transformers_export.export(self.backbone, tokenizer, path, max_shard_size, dtype)

    def export_to_gguf(self, path, type="f32"):
        """Saves this model, tokenizer included, as one GGUF file that
        llama.cpp (and Ollama, LM Studio) runs.

        Args:
            path: the `.gguf` file to write.
            type: the tensor type: `"f32"`, `"f16"` or `"q8_0"` (llama.cpp's
                8-bit blocks; norms stay float32, as llama.cpp writes them).

        Example:
        ```python
        gemma_lm.export_to_gguf("gemma.gguf", type="q8_0")
        ```
        """
        from keras_gemma.convert import gguf_export

        if self.preprocessor is None:
            raise ValueError(
                "export_to_gguf writes the tokenizer into the file, and this model has "
                "no preprocessor: build it with one (GemmaCausalLM(backbone, preprocessor))."
            )
        gguf_export.export(self.backbone, self.preprocessor.tokenizer, path, type)

    def get_quantization_layer_structure(self, mode=None):
        """Keras' hook for GPTQ and AWQ calibration: the blocks in order, and
        before them the backbone's own `embed` (embeddings times
        sqrt(hidden_dim), as keras-hub's Gemma), so each block calibrates on
        the inputs it gets in the real forward pass."""
        if mode not in ("gptq", "awq"):
            return None
        token_ids = keras.Input(shape=(None,), dtype="int32")
        embed = keras.Model(token_ids, self.backbone.embed(token_ids), name="embed")
        return {"pre_block_layers": [embed], "sequential_blocks": list(self.backbone.transformer_layers)}

    # === Inference ===

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One cached forward step of `token_ids` `(batch, seq)` at positions
        `cache_update_index...` (see `GemmaBackbone.call_with_cache`):
        `(logits, hidden_states, cache)`. `cache` is ours (a tuple, one
        tensor per layer: `backbone.init_cache`) or keras-hub's, one tensor
        `(batch, num_layers, 2, length, num_key_value_heads, head_dim)` (as
        its `_build_cache` makes), given back in the layout it came in."""
        stacked = not isinstance(cache, (tuple, list))
        if stacked:
            cache = tuple(cache[:, i] for i in range(self.backbone.num_layers))
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index
        )
        if stacked:
            cache = ops.stack(cache, axis=1)
        return self.backbone.logits(hidden_states), hidden_states, cache

    def _build_cache(self, token_ids):
        """keras-hub's: `(hidden_states, cache)` of `token_ids` run from
        position 0 over a cache as long as they are, in keras-hub's stacked
        layout (for code written against keras-hub's `call_with_cache`)."""
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        b = self.backbone
        cache = ops.zeros((batch_size, b.num_layers, 2, length, b.num_key_value_heads, b.head_dim), b.compute_dtype)
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0)
        return hidden_states, cache

    def generate(
        self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False, truncate_prompt=False
    ):
        """Generates text (or token ids) continuing `inputs`, with the sampler
        given to `compile()` (greedy by default). The cache has `max_length`
        positions; prompts are prefilled in one pass over a length bucket, so
        prompts of other lengths in the same bucket reuse the compiled
        function (`keras_gemma.generation`).

        Args:
            inputs: a string, a list of strings, a `tf.data.Dataset` of them,
                or (without a preprocessor) `{"token_ids", "padding_mask"}`
                padded to the output length.
            max_length: int. Total length, prompt included.
            stop_token_ids: `"auto"` (`<eos>`), `None` (run to `max_length`)
                or a list of ids; a row stops after its first one.
            strip_prompt: bool. Return only the new text.
            truncate_prompt: bool. A prompt that leaves no room to generate
                is an error (False), or is cut from the left to leave room
                for `max_length // 4` new tokens, at least one (True).

        Example:
        ```python
        gemma_lm.generate("The capital of France is", max_length=32)
        gemma_lm.generate(long_document, max_length=2048, truncate_prompt=True)
        ```
        """
        return generation.generate(
            self, inputs, max_length, stop_token_ids, strip_prompt, truncate_prompt
        )

    def make_generate_function(self):
        """The compiled `generate_step`, cached until `compile` or `quantize`."""
        if self.generate_function is None:
            self.generate_function = generation.generate_function(self)
        return self.generate_function

    def generate_step(self, inputs, stop_token_ids=None, prefill_length=None):
        """Generates for one batch of dense inputs (`generation.generate_step`)."""
        return generation.generate_step(self, inputs, stop_token_ids, prefill_length)

    def generate_stream(
        self, prompt, max_length=None, stop_token_ids="auto", strip_prompt=False, truncate_prompt=False
    ):
        """Yields the text of `generate(prompt, ...)` for one prompt string,
        piece by piece as the tokens are produced: the pieces joined equal
        what `generate` returns with the same arguments and sampler state.
        Beam and contrastive search rank whole sequences and cannot stream.

        Example:
        ```python
        for piece in gemma_lm.generate_stream("Once upon a time", max_length=64):
            print(piece, end="", flush=True)
        ```
        """
        if self._stream_functions is None:
            self._stream_functions = generation.stream_functions(self)
        return generation.stream(
            self, self._stream_functions, prompt, max_length, stop_token_ids,
            strip_prompt, truncate_prompt,
        )

    def chat(self, messages, max_length=None, stop_token_ids="auto", **kwargs):
        """The model's reply to `messages` (`{"role", "content"}` dicts, see
        `format_chat`), as a string; generation stops at `<end_of_turn>` or
        `<eos>` by default. `kwargs` go to `generate` (`keras_gemma.chat.chat`).

        Example:
        ```python
        reply = gemma_lm.chat([{"role": "user", "content": "Knock knock."}])
        ```
        """
        return chat.chat(self, messages, max_length, stop_token_ids, **kwargs)

    def chat_stream(self, messages, max_length=None, stop_token_ids="auto", **kwargs):
        """`chat`, yielding the reply piece by piece (see `generate_stream`)."""
        return chat.chat(self, messages, max_length, stop_token_ids, stream=True, **kwargs)

    def score(
        self, token_ids, padding_mask=None, scoring_mode="logits", layer_intercept_fn=None,
        target_ids=None,
    ):
        """Scores token sequences: per-token logits or per-token losses.

        Args:
            token_ids: int `(batch, seq)`, for example `generate()` output.
            padding_mask: `(batch, seq)`, 1 on real tokens; all ones if omitted.
            scoring_mode: `"logits"` for `(batch, seq, vocabulary_size)` logits,
                `"loss"` for `(batch, seq)` cross-entropy against `target_ids`.
            layer_intercept_fn: optional `fn(x, i)` returning a replacement for
                the activations after the embedding (`i == -1`) and after each
                decoder block `i`, for interpretability work.
            target_ids: int `(batch, seq)`, required for `"loss"`.

        Example:
        ```python
        x = gemma_lm.preprocessor.generate_preprocess(["The sky is blue."])
        targets = keras.ops.roll(x["token_ids"], shift=-1, axis=1)
        losses = gemma_lm.score(
            x["token_ids"], x["padding_mask"], scoring_mode="loss",
            target_ids=targets,
        )
        ```
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(f"scoring_mode must be 'logits' or 'loss'; got {scoring_mode!r}.")
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError("scoring_mode='loss' needs `target_ids`.")
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids)[:2], dtype="int32")
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        hidden_states = self.backbone(inputs, layer_intercept_fn=layer_intercept_fn)
        logits = self.backbone.logits(hidden_states)
        if scoring_mode == "logits":
            return logits
        return keras.losses.sparse_categorical_crossentropy(target_ids, logits, from_logits=True)
