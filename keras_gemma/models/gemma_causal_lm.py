"""Gemma for causal language modelling: logits, generation, scoring."""

import keras
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(CausalLM):
    """A Gemma backbone with the tied output projection: next-token logits.

    Calling the model gives float32 logits `(batch, seq, vocabulary_size)`.
    `generate()` decodes with a preallocated key/value cache on every backend
    (XLA-compiled on JAX and TensorFlow), using the sampler given to
    `compile()` (greedy by default; any `keras_hub.samplers` sampler works).
    With a preprocessor attached, `generate`, `fit`, `predict` and `evaluate`
    take strings.

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
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = self._logits(hidden_states)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds the model, with its tokenizer, from a preset.

        Args:
            preset: a directory written by `save_to_preset`, a local Hugging
                Face Transformers directory (`config.json`, `*.safetensors`,
                `tokenizer.model`), or a name in `keras_gemma.presets.PRESETS`
                (architecture only: `load_weights=False`, no preprocessor).
            load_weights: bool. Load the weights (True) or keep random ones.
            **kwargs: for example `dtype="bfloat16"`, or `preprocessor=None`.

        Example:
        ```python
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/gemma-2b")
        gemma_lm.generate("The capital of France is", max_length=16)
        ```
        """
        from keras_gemma.convert import check_preset_class, get_preset_loader

        loader = get_preset_loader(preset)
        check_preset_class(loader, cls)
        return loader.load_task(cls, load_weights, True, **kwargs)

    def _logits(self, hidden_states):
        # Tied output projection; logits returned in float32 for a stable
        # softmax and loss whatever the compute dtype.
        logits = self.backbone.token_embedding(hidden_states, reverse=True)
        logits = ops.cast(logits, "float32")  # (b, t, vocabulary_size)
        cap = self.backbone.final_logit_soft_cap
        if cap is not None:
            logits = ops.tanh(logits / cap) * cap
        return logits

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    def compile_from_config(self, config):
        # Restores the saved optimizer, loss and metrics when a `.keras` file is
        # loaded (Keras skips this for models that override `compile`).
        self.compile(**keras.saving.deserialize_keras_object(config))

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One cached forward step.

        Args:
            token_ids: int `(batch, seq)` at positions `cache_update_index...`.
            cache: the per-layer cache tuple of `GemmaBackbone.init_cache`.
            cache_update_index: int or scalar tensor.

        Returns:
            `(logits, hidden_states, cache)`.
        """
        hidden_states, cache = self.backbone.call_with_cache(
            token_ids, cache, cache_update_index
        )
        return self._logits(hidden_states), hidden_states, cache

    def _build_cache(self, token_ids):
        """Fills a fresh cache with a single pass over `token_ids`."""
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = self.backbone.init_cache(batch_size, length)
        # The prefill needs keys and values only: no logits over the vocabulary.
        return self.backbone.call_with_cache(token_ids, cache, 0)

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates for one batch of dense inputs (compilable).

        `inputs["token_ids"]` is right-padded to the full output length and
        `inputs["padding_mask"]` marks the prompt tokens. Decoding starts at
        the shortest prompt; longer prompts keep their own tokens until they
        run out, so every row sees exactly the positions a full forward pass
        would give it.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(token_ids)
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)

        def next(prompt, cache, index):
            # Feed the token before `index`; its logits predict `index`.
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(
                prompt, cache, cache_update_index
            )
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                cache,
            )

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )

        if stop_token_ids is not None:
            # Keep everything up to and including each row's first new stop token.
            stop = any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask))
            stop = ops.cast(stop, "int32")
            after_stop = ops.cumsum(stop, axis=-1) - stop
            padding_mask = ops.equal(after_stop, 0)
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
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
            raise ValueError(
                f"scoring_mode must be 'logits' or 'loss'; got {scoring_mode!r}."
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError("scoring_mode='loss' needs `target_ids`.")
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids)[:2], dtype="int32")
        if layer_intercept_fn is None:

            def layer_intercept_fn(x, unused_i):
                return x

        x = layer_intercept_fn(self.backbone.embed(token_ids), -1)
        for i, block in enumerate(self.backbone.transformer_layers):
            x = layer_intercept_fn(block(x, padding_mask=padding_mask), i)
        logits = self._logits(self.backbone.layer_norm(x))
        if scoring_mode == "logits":
            return logits
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none"
        )
        return loss_fn(target_ids, logits)
