"""Gemma for causal language modelling: logits, generation, scoring."""

import contextlib
import functools
import itertools

import keras
import numpy as np
from keras import ops
from keras.src.losses.loss import scale_loss_for_distribution
from keras.src.quantizers.utils import should_quantize_layer
from keras_hub.models import CausalLM
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import ContrastiveSampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_gemma.chat import format_chat
from keras_gemma.layers.projection import cpu_matmul
from keras_gemma.layers.projection import single_torch_thread
from keras_gemma.models.cross_entropy import chunked_cross_entropy
from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_causal_lm_preprocessor import GemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(CausalLM):
    """A Gemma backbone with the tied output projection: next-token logits.

    Calling the model gives float32 logits `(batch, seq, vocabulary_size)`.
    `generate()` decodes with a preallocated key/value cache on every backend
    (compiled on JAX and TensorFlow), using the sampler given to
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
        from keras_gemma import convert

        return convert.from_preset(cls, preset, super().from_preset, load_weights=load_weights, **kwargs)

    def _logits(self, hidden_states):
        # Tied output projection; logits returned in float32 for a stable
        # softmax and loss whatever the compute dtype.
        logits = tied_output_projection(self.backbone.token_embedding, hidden_states)
        logits = ops.cast(logits, "float32")  # (b, t, vocabulary_size)
        cap = self.backbone.final_logit_soft_cap
        if cap is not None:
            logits = ops.tanh(logits / cap) * cap
        return logits

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.fit`, with the preprocessor's inputs (strings, lists
        of strings, `tf.data`) or preprocessed tensors, as in keras-hub.

        Chat fine-tuning: given conversations (a list of `{"role",
        "content"}` message lists), the preprocessor's
        `preprocess_conversations` formats them with `format_chat` and puts
        the loss only on the model's replies, their `<end_of_turn>` included.

        Example:
        ```python
        chats = [[
            {"role": "user", "content": "Name a primary color."},
            {"role": "model", "content": "Red."},
        ]]
        gemma_lm.fit(chats, batch_size=1, epochs=3)
        ```
        """
        if _is_conversations(x):
            if self.preprocessor is None:
                raise ValueError("Fitting on conversations needs a preprocessor (a tokenizer).")
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "Conversations carry their own targets: pass no `y` or `sample_weight`."
                )
            x, y, sample_weight = self.preprocessor.preprocess_conversations(x)
            # Already packed: skip the string pipeline of keras-hub's fit.
            return keras.Model.fit(
                self, x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
            )
        return super().fit(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        jit_compile = kwargs.pop("jit_compile", "auto")
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            jit_compile=jit_compile,
            **kwargs,
        )
        if (
            jit_compile == "auto"
            and keras.config.backend() == "tensorflow"
            and getattr(self, "_distribute_strategy", None) is None
        ):
            # Speed: Keras' "auto" leaves TensorFlow without XLA on machines
            # with no GPU. With XLA, b2l LoRA training on the development CPU
            # runs 3.2x faster (benchmarks/finetune.py: 42.9 tokens/s against
            # keras-hub's 13.4 without XLA, 43.5 with) and its 2048-token
            # step peaks at 6.0 GB instead of 7.3. Generation keeps its own
            # graph (see `_compile`).
            self.jit_compile = True

    def call(self, inputs, training=None, mask=None):
        # In fit, a loss that chunked_cross_entropy can compute gets the final
        # hidden states instead of logits (see compute_loss).
        self._hidden_states_for_loss = bool(training) and self._chunked_loss_applies()
        if self._hidden_states_for_loss:
            return self.backbone(inputs, training=training)
        return super().call(inputs, training=training, mask=mask)

    def _chunked_loss_applies(self):
        """Whether the compiled loss and metrics are the default kind: sparse
        cross-entropy from logits (no ignore_class, a sum or mean reduction)
        and only weighted sparse categorical accuracy. Anything else trains
        from full logits, as keras-hub does."""
        loss = getattr(self, "loss", None)
        if not (
            isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
            and loss.from_logits
            and loss.ignore_class is None
            and loss.reduction in ("sum_over_batch_size", "sum")
            and getattr(self._compile_loss, "_user_loss_weights", None) is None
        ):
            return False
        metrics = self._compile_metrics
        if metrics is None:
            return True
        if metrics._user_metrics:  # unweighted metrics count padding too
            return False
        return all(
            isinstance(m, keras.metrics.SparseCategoricalAccuracy)
            or m == "sparse_categorical_accuracy"
            for m in keras.tree.flatten(metrics._user_weighted_metrics or [])
        )

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss. In fit, with the default loss and metrics, the
        cross-entropy and accuracy come from the final hidden states in chunks
        of tokens (`chunked_cross_entropy`): float32 logits never exist for
        every token at once. The result equals the plain computation."""
        if not getattr(self, "_hidden_states_for_loss", False):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        embedding = self.backbone.token_embedding
        if sample_weight is None:
            sample_weight = ops.ones(ops.shape(y), "float32")
        totals = chunked_cross_entropy(
            y_pred,
            embedding.embeddings,
            y,
            sample_weight,
            soft_cap=self.backbone.final_logit_soft_cap,
            train_embeddings=embedding.trainable and embedding.embeddings.trainable,
        )
        loss = totals[0]
        if self.loss.reduction == "sum_over_batch_size":
            loss = scale_loss_for_distribution(loss / ops.cast(ops.size(y), "float32"))
        weight_sum = ops.sum(ops.cast(sample_weight, "float32"))
        if self._compile_metrics is not None:
            if not self._compile_metrics.built:  # TensorFlow builds them here
                logits_spec = keras.KerasTensor(
                    tuple(y.shape) + (embedding.input_dim,), dtype="float32"
                )
                self._compile_metrics.build(y, logits_spec)
            for metric in self._compile_metrics.metrics:
                # What the metric's own update computes from full logits.
                keras.metrics.Mean.update_state(
                    metric, ops.divide_no_nan(totals[1], weight_sum), sample_weight=weight_sum
                )
        losses = [loss] + [self._aggregate_additional_loss(extra) for extra in self.losses]
        return losses[0] if len(losses) == 1 else ops.sum(losses)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if getattr(self, "_hidden_states_for_loss", False):
            # compute_loss has updated the accuracy from the same logits.
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize` over the network, skipping the
        preprocessor: Keras would visit its tokenizer, an unbuilt layer
        without weights, and refuse the whole model."""
        skip = set()
        if self.preprocessor is not None:
            skip = {id(layer) for layer in self.preprocessor._flatten_layers()}

        def network_only(layer):
            return id(layer) not in skip and should_quantize_layer(layer, filters)

        super().quantize(mode, config=config, filters=network_only, **kwargs)

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

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        truncate_prompt=False,
    ):
        """Generates text (or token ids) continuing `inputs`.

        Prompts are padded to `max_length` (default: the preprocessor's
        `sequence_length`); the cache has that length, and the prompt is
        prefilled in one pass over a length bucket (a power of two, at least
        16), so prompts of other lengths in the same bucket reuse the compiled
        function. The sampler is the one given to `compile()` (greedy by
        default).

        Args:
            inputs: a string, a list of strings, or (without a preprocessor)
                `{"token_ids", "padding_mask"}` padded to the output length.
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
        with self._prompt_truncation(truncate_prompt):
            return super().generate(
                inputs,
                max_length=max_length,
                stop_token_ids=stop_token_ids,
                strip_prompt=strip_prompt,
            )

    @contextlib.contextmanager
    def _prompt_truncation(self, truncate_prompt):
        """Lets the preprocessor truncate prompts for one call (keras-hub's
        `generate` calls `generate_preprocess` without extra arguments)."""
        if not truncate_prompt:
            yield
            return
        if self.preprocessor is None:
            raise ValueError("truncate_prompt=True needs a preprocessor (string prompts).")
        self.preprocessor.truncate_prompt = True
        try:
            yield
        finally:
            self.preprocessor.truncate_prompt = False

    def make_generate_function(self):
        """The compiled `generate_step`, with the prefill length as a static
        argument taken from the shortest prompt's length bucket."""
        if self.generate_function is not None:
            return self.generate_function
        compiled = self._compile(self.generate_step, ("stop_token_ids", "prefill_length"))

        def generate_function(inputs, stop_token_ids=None):
            padding_mask = ops.convert_to_numpy(inputs["padding_mask"])
            prefill_length = prefill_bucket(
                int(padding_mask.sum(axis=-1).min()) - 1, padding_mask.shape[1]
            )
            if stop_token_ids is not None:
                stop_token_ids = tuple(stop_token_ids)
            return compiled(
                inputs, stop_token_ids=stop_token_ids, prefill_length=prefill_length
            )

        self.generate_function = generate_function
        return generate_function

    def _compile(self, fn, static_argnames=(), donate_argnums=()):
        """`fn` compiled for the backend: XLA on JAX, a graph on TensorFlow,
        eager without autograd on PyTorch. Model weights are read, never written;
        the sampler's seed state advances. Keyword arguments named in
        `static_argnames` are compile-time constants (one trace per value).
        """
        backend = keras.config.backend()
        if self.run_eagerly or backend not in ("jax", "tensorflow", "torch"):
            return fn
        if backend == "tensorflow":
            import tensorflow as tf

            # Speed: TensorFlow's bundled XLA turns the one-token projections
            # into slow loops (20 ms for a 16 MB query kernel, 3.5x slower
            # decoding of b2l); TensorFlow's own kernels run them at memory
            # speed. Retraced per static argument value, as on JAX.
            return tf.function(fn, jit_compile=False)
        if backend == "torch":
            import torch

            def no_grad_fn(*args, **kwargs):
                with torch.no_grad(), single_torch_thread():
                    return fn(*args, **kwargs)

            return no_grad_fn
        import jax

        @functools.partial(
            jax.jit,
            static_argnames=static_argnames,
            donate_argnums=tuple(i + 1 for i in donate_argnums),
        )
        def stateless_fn(state, *args, **kwargs):
            sampler_values, trainable_values, non_trainable_values = state
            mapping = itertools.chain(
                zip(self.sampler.variables, sampler_values),
                zip(self.trainable_variables, trainable_values),
                zip(self.non_trainable_variables, non_trainable_values),
            )
            with keras.StatelessScope(state_mapping=mapping) as scope:
                outputs = fn(*args, **kwargs)
            sampler_values = [
                v if scope.get_current_value(v) is None else scope.get_current_value(v)
                for v in self.sampler.variables
            ]
            return outputs, sampler_values

        def jax_fn(*args, **kwargs):
            state = (
                [v.value for v in self.sampler.variables],
                [v.value for v in self.trainable_variables],
                [v.value for v in self.non_trainable_variables],
            )
            outputs, sampler_values = stateless_fn(state, *args, **kwargs)
            for variable, value in zip(self.sampler.variables, sampler_values):
                variable.assign(value)
            return outputs

        return jax_fn

    def generate_step(self, inputs, stop_token_ids=None, prefill_length=None):
        """Generates for one batch of dense inputs (compilable).

        `inputs["token_ids"]` is right-padded to the full output length and
        `inputs["padding_mask"]` marks the prompt tokens. The first
        `prefill_length` positions (default: all) are written to the cache in
        one pass; decoding starts at the shortest prompt, and longer prompts
        keep their own tokens until they run out, so every row sees exactly
        the positions a full forward pass would give it. Any `prefill_length`
        up to the shortest prompt's length minus one is enough; positions
        past it are rewritten by decoding before anything attends to them.
        """
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = self.backbone.init_cache(batch_size, max_length)
        hidden_states = None
        if isinstance(self.sampler, ContrastiveSampler):
            # Contrastive search compares candidates with the hidden states
            # of all earlier positions, so here the prefill runs the whole
            # network over the prompt.
            hidden_states, cache = self.backbone.call_with_cache(token_ids, cache, 0)
        else:
            if prefill_length is None:
                prefill_length = max_length
            if prefill_length > 0:
                cache = self.backbone.prefill(token_ids[:, :prefill_length], cache)
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

    def generate_stream(
        self,
        prompt,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        truncate_prompt=False,
    ):
        """Yields the text of `generate(prompt, ...)` piece by piece, as the
        tokens are produced.

        The pieces joined equal what `generate` returns with the same
        arguments and sampler state (with `strip_prompt=False` the first piece
        is the prompt). A piece is held back while it ends in an incomplete
        UTF-8 character. Takes one prompt string; beam and contrastive search
        rank whole sequences and cannot stream.

        Args:
            prompt: str.
            max_length, stop_token_ids, strip_prompt, truncate_prompt: as for
                `generate`.

        Example:
        ```python
        for piece in gemma_lm.generate_stream("Once upon a time", max_length=64):
            print(piece, end="", flush=True)
        ```
        """
        if self.preprocessor is None or not isinstance(prompt, str):
            raise ValueError(
                "generate_stream takes one prompt string and needs a preprocessor; "
                f"got {type(prompt).__name__}."
            )
        if isinstance(self.sampler, (BeamSampler, ContrastiveSampler)):
            raise ValueError(
                f"{type(self.sampler).__name__} ranks whole sequences and cannot "
                "stream; use generate(), or a greedy, top-k, top-p or random sampler."
            )
        tokenizer = self.preprocessor.tokenizer
        if stop_token_ids == "auto":
            stop_token_ids = [tokenizer.end_token_id]
        stop_token_ids = set(stop_token_ids or ())
        with self._prompt_truncation(truncate_prompt):
            x = self.preprocessor.generate_preprocess([prompt], sequence_length=max_length)
        token_ids = np.array(ops.convert_to_numpy(x["token_ids"]), dtype="int32")
        prompt_length = int(ops.convert_to_numpy(x["padding_mask"]).sum())
        max_length = token_ids.shape[1]
        prefill, step = self._stream_functions()

        strip = set(tokenizer.special_token_ids)
        first = prompt_length if strip_prompt else 0

        def text(end):
            ids = [int(i) for i in token_ids[0, first:end] if int(i) not in strip]
            out = tokenizer.detokenize([ids])[0]
            return out.decode("utf-8") if isinstance(out, bytes) else str(out)

        cache = self.backbone.init_cache(1, max_length)
        prefill_length = prefill_bucket(prompt_length - 1, max_length)
        if prefill_length > 0:
            cache = prefill(token_ids[:, :prefill_length], cache)
        shown = current = text(prompt_length)
        if shown:
            yield shown
        for index in range(prompt_length, max_length):
            position = ops.convert_to_tensor(index - 1, "int32")
            next_token, cache = step(token_ids[:, index - 1 : index], cache, position)
            token_ids[0, index] = int(ops.convert_to_numpy(next_token)[0])
            current = text(index + 1)
            if current.startswith(shown) and not current.endswith("\ufffd"):
                if len(current) > len(shown):
                    yield current[len(shown) :]
                shown = current
            if int(token_ids[0, index]) in stop_token_ids:
                break
        if current != shown and current.startswith(shown):
            yield current[len(shown) :]

    def _stream_functions(self):
        """Compiled `(prefill, step)` for `generate_stream`; rebuilt after
        `compile()` changes the sampler."""
        if getattr(self, "_stream_sampler", None) is not self.sampler:

            def prefill(token_ids, cache):
                return self.backbone.prefill(token_ids, cache)

            def step(token_ids, cache, index):
                logits, _, cache = self.call_with_cache(token_ids, cache, index)
                probabilities = self.sampler.compute_probabilities(logits[:, 0])
                return self.sampler.get_next_token(probabilities), cache

            # The cache is donated on JAX: each step updates it in place.
            self._stream_fns = (
                self._compile(prefill, donate_argnums=(1,)),
                self._compile(step, donate_argnums=(1,)),
            )
            self._stream_sampler = self.sampler
        return self._stream_fns

    def chat(self, messages, max_length=None, stop_token_ids="auto", **kwargs):
        """The model's reply to a conversation, as a string.

        The conversation is written with `keras_gemma.format_chat` (ending
        with the model's turn opened) and generation stops at
        `<end_of_turn>` (or `<eos>`), which is not part of the reply.

        Args:
            messages: list of `{"role": "user"|"model"|"assistant"|"system",
                "content": str}` (see `format_chat`).
            max_length: int. Total length, conversation included.
            stop_token_ids: `"auto"` for `<end_of_turn>` and `<eos>`, or ids.
            **kwargs: passed to `generate` (for example `truncate_prompt`).

        Example:
        ```python
        reply = gemma_lm.chat([{"role": "user", "content": "Knock knock."}])
        ```
        """
        prompt, stop_token_ids = self._chat_prompt(messages, stop_token_ids)
        return self.generate(
            prompt, max_length=max_length, stop_token_ids=stop_token_ids,
            strip_prompt=True, **kwargs
        )

    def chat_stream(self, messages, max_length=None, stop_token_ids="auto", **kwargs):
        """`chat`, yielding the reply piece by piece (see `generate_stream`)."""
        prompt, stop_token_ids = self._chat_prompt(messages, stop_token_ids)
        return self.generate_stream(
            prompt, max_length=max_length, stop_token_ids=stop_token_ids,
            strip_prompt=True, **kwargs
        )

    def _chat_prompt(self, messages, stop_token_ids):
        if self.preprocessor is None:
            raise ValueError("chat needs a preprocessor with a tokenizer.")
        tokenizer = self.preprocessor.tokenizer
        if stop_token_ids == "auto":
            stop_token_ids = [tokenizer.end_of_turn_token_id, tokenizer.end_token_id]
        return format_chat(messages, add_generation_prompt=True), stop_token_ids

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


def _is_conversations(x):
    """A list of message lists (or one message list) for chat fine-tuning."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    if isinstance(first, dict):
        return "role" in first
    return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], dict)


def prefill_bucket(length, max_length, minimum=16):
    """Positions to prefill for a shortest prompt of `length + 1` tokens: the
    next power of two (at least `minimum`), within `max_length`; 0 for none.
    Rounding up keeps the number of compiled prefill shapes logarithmic."""
    if length <= 0:
        return 0
    return min(max(minimum, 1 << (length - 1).bit_length()), max_length)


def tied_output_projection(embedding, hidden_states):
    """`hidden_states @ embeddings.T`: `(b, t, d)` -> `(b, t, vocabulary_size)`.
    Reads the whole 256k-row embedding for every new token, most of a
    decoding step: on PyTorch it takes the same CPU shortcut as the layers'
    projections (`cpu_matmul`)."""
    if (
        embedding.quantization_mode is None
        and not embedding.lora_enabled
        # Building the functional model: the layer call goes into its graph
        # (an op on the variable here would capture its current value).
        and not isinstance(hidden_states, keras.KerasTensor)
    ):
        logits = cpu_matmul(hidden_states, embedding.embeddings, 1, False)
        if logits is not None:
            return logits
        # Speed: the einsum, not the layer's `matmul(x, transpose(embeddings))`:
        # XLA on CPU runs the latter's one-token product at 29-37 GB/s of
        # weights read, the einsum at 32-44 (JAX, alternated runs on the
        # development machine; TensorFlow runs both alike). Generation calls
        # this directly; `fit` and `predict` go through the layer.
        dtype = embedding.compute_dtype
        return ops.einsum(
            "btd,vd->btv",
            ops.cast(hidden_states, dtype),
            ops.cast(embedding.embeddings, dtype),
        )
    return embedding(hidden_states, reverse=True)
