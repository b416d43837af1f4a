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
        """Builds the model, with its tokenizer, from a preset: a directory
        written by `save_to_preset`, a local Hugging Face Transformers
        directory, a `.gguf` file, or a name in `keras_gemma.presets.PRESETS`
        (architecture only: `load_weights=False`, no preprocessor). `kwargs`:
        for example `dtype="bfloat16"`, or `preprocessor=None`."""
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
        `(logits, hidden_states, cache)`."""
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index
        )
        return self.backbone.logits(hidden_states), hidden_states, cache

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
