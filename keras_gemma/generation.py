"""Generation for `GemmaCausalLM`: prompt buckets, prefill, the decode loop,
streaming, and the compiled functions behind them.

The model supplies the network (`backbone.init_cache`, `backbone.prefill`,
`call_with_cache`) and the sampler given to `compile()`; everything here is
functions of the model, compiled once per prompt-length bucket through
`keras_gemma.backend.inference_function`.
"""

import numpy as np
from keras import distribution
from keras import ops
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import ContrastiveSampler

from keras_gemma import backend


def prefill_bucket(length, max_length, minimum=16):
    """Positions to prefill for a shortest prompt of `length + 1` tokens: the
    next power of two (at least `minimum`), within `max_length`; 0 for none.
    Rounding up keeps the number of compiled prefill shapes logarithmic."""
    if length <= 0:
        return 0
    return min(max(minimum, 1 << (length - 1).bit_length()), max_length)


def generate(lm, inputs, max_length, stop_token_ids, strip_prompt, truncate_prompt):
    """`GemmaCausalLM.generate`: keras-hub's pipeline (preprocess, generate
    each batch, strip the prompt, postprocess), with prompt truncation."""
    preprocessor = lm.preprocessor
    if stop_token_ids == "auto":
        if preprocessor is None:
            raise ValueError(
                'stop_token_ids="auto" needs a preprocessor (its tokenizer\'s <eos>); '
                "without one, pass stop_token_ids=None or a list of token ids."
            )
        stop_token_ids = [preprocessor.tokenizer.end_token_id]
    if truncate_prompt and preprocessor is None:
        raise ValueError("truncate_prompt=True needs a preprocessor (string prompts).")
    generate_function = lm.make_generate_function()
    batches, is_scalar = _batches(inputs, preprocessor)
    outputs = []
    for batch in batches:
        if preprocessor is not None:
            batch = preprocessor.generate_preprocess(
                batch, sequence_length=max_length, truncate_prompt=truncate_prompt
            )
        batch = _distribute(batch)
        output = generate_function(batch, stop_token_ids=stop_token_ids)
        if strip_prompt:
            output = _strip_prompt(output, batch["padding_mask"])
        if preprocessor is not None:
            output = preprocessor.generate_postprocess(output)
        outputs.append(output)
    if preprocessor is not None:
        texts = [text for batch in outputs for text in batch]
        return texts[0] if is_scalar else texts
    return {
        key: ops.convert_to_numpy(ops.concatenate([o[key] for o in outputs], axis=0))
        for key in outputs[0]
    }


def _batches(inputs, preprocessor):
    """(batches, whether the input was one string), as keras-hub's generate
    takes them: a `tf.data.Dataset` is generated batch by batch; anything
    else is one batch."""
    if hasattr(inputs, "as_numpy_iterator"):  # a tf.data.Dataset
        return inputs.as_numpy_iterator(), False
    if preprocessor is not None and isinstance(inputs, str):
        return [[inputs]], True
    return [inputs], False


def _distribute(batch):
    """The batch laid out by the active `keras.distribution`, if any."""
    current = distribution.distribution()
    if current is None:
        return batch

    def place(value):
        value = ops.convert_to_tensor(value)
        layout = current.get_data_layout(value.shape)
        return distribution.distribute_tensor(value, layout) if layout else value

    return {key: place(value) for key, value in batch.items()}


def _strip_prompt(output, prompt_mask):
    """The generated tokens only: each row rolled left by its prompt length,
    with the prompt positions masked out."""
    prompt_mask = ops.convert_to_tensor(prompt_mask)
    length = ops.shape(prompt_mask)[1]
    shifts = ops.mod(-ops.sum(ops.cast(prompt_mask, "int32"), axis=1), length)
    index = ops.arange(length, dtype="int32")[None, :] - shifts[:, None]  # (b, t)

    def roll(x):
        return ops.take_along_axis(ops.convert_to_tensor(x), index, axis=1)

    return {
        "token_ids": roll(output["token_ids"]),
        "padding_mask": ops.logical_xor(roll(prompt_mask), roll(output["padding_mask"])),
    }


def generate_function(lm):
    """The compiled `generate_step` of `lm`, with the prefill length as a
    static argument taken from the shortest prompt's length bucket."""
    compiled = backend.inference_function(
        lm, lm.generate_step, static_argnames=("stop_token_ids", "prefill_length")
    )

    def generate_batch(inputs, stop_token_ids=None):
        padding_mask = ops.convert_to_numpy(inputs["padding_mask"])
        prefill_length = prefill_bucket(
            int(padding_mask.sum(axis=-1).min()) - 1, padding_mask.shape[1]
        )
        if stop_token_ids is not None:
            stop_token_ids = tuple(stop_token_ids)
        return compiled(inputs, stop_token_ids=stop_token_ids, prefill_length=prefill_length)

    return generate_batch


def generate_step(lm, inputs, stop_token_ids=None, prefill_length=None):
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
    cache = lm.backbone.init_cache(batch_size, max_length)
    hidden_states = None
    if isinstance(lm.sampler, ContrastiveSampler):
        # Contrastive search compares candidates with the hidden states of
        # all earlier positions, so the prefill runs the whole network.
        hidden_states, cache = lm.backbone.call_with_cache(token_ids, cache, 0)
    else:
        prefill_length = max_length if prefill_length is None else prefill_length
        if prefill_length > 0:
            cache = lm.backbone.prefill(token_ids[:, :prefill_length], cache)
    row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)

    def next(prompt, cache, index):
        # Feed the token before `index`; its logits predict `index`.
        cache_update_index = index - 1
        prompt = ops.slice(prompt, [0, cache_update_index], [ops.shape(prompt)[0], 1])
        logits, hidden_states, cache = lm.call_with_cache(prompt, cache, cache_update_index)
        return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

    token_ids = lm.sampler(
        next=next,
        prompt=token_ids,
        cache=cache,
        index=ops.min(row_lengths),
        mask=padding_mask,
        stop_token_ids=stop_token_ids,
        hidden_states=hidden_states,
        model=lm,
    )
    if stop_token_ids is None:
        return {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, dtype="bool")}
    # Keep everything up to and including each row's first new stop token.
    is_stop = ops.zeros_like(token_ids, dtype="bool")
    for stop in stop_token_ids:
        is_stop = ops.logical_or(is_stop, ops.equal(token_ids, stop))
    stop = ops.cast(ops.logical_and(is_stop, ops.logical_not(padding_mask)), "int32")
    after_stop = ops.cumsum(stop, axis=-1) - stop
    return {"token_ids": token_ids, "padding_mask": ops.equal(after_stop, 0)}


def stream_functions(lm):
    """Compiled `(prefill, step)` for `stream`; the cache is donated on JAX,
    so each step updates it in place."""

    def prefill(token_ids, cache):
        return lm.backbone.prefill(token_ids, cache)

    def step(token_ids, cache, index):
        logits, _, cache = lm.call_with_cache(token_ids, cache, index)
        probabilities = lm.sampler.compute_probabilities(logits[:, 0])
        return lm.sampler.get_next_token(probabilities), cache

    return (
        backend.inference_function(lm, prefill, donate_argnums=(1,)),
        backend.inference_function(lm, step, donate_argnums=(1,)),
    )


def stream(lm, functions, prompt, max_length, stop_token_ids, strip_prompt, truncate_prompt):
    """`GemmaCausalLM.generate_stream`, with `functions` from
    `stream_functions(lm)`."""
    if lm.preprocessor is None or not isinstance(prompt, str):
        raise ValueError(
            "generate_stream takes one prompt string and needs a preprocessor; "
            f"got {type(prompt).__name__}."
        )
    if isinstance(lm.sampler, (BeamSampler, ContrastiveSampler)):
        raise ValueError(
            f"{type(lm.sampler).__name__} ranks whole sequences and cannot "
            "stream; use generate(), or a greedy, top-k, top-p or random sampler."
        )
    tokenizer = lm.preprocessor.tokenizer
    if stop_token_ids == "auto":
        stop_token_ids = [tokenizer.end_token_id]
    stop_token_ids = set(stop_token_ids or ())
    x = lm.preprocessor.generate_preprocess(
        [prompt], sequence_length=max_length, truncate_prompt=truncate_prompt
    )
    token_ids = np.array(ops.convert_to_numpy(x["token_ids"]), dtype="int32")
    prompt_length = int(ops.convert_to_numpy(x["padding_mask"]).sum())
    max_length = token_ids.shape[1]
    prefill, step = functions
    strip = set(tokenizer.special_token_ids)
    first = prompt_length if strip_prompt else 0

    def text(end):
        ids = [int(i) for i in token_ids[0, first:end] if int(i) not in strip]
        out = tokenizer.detokenize([ids])[0]
        return out.decode("utf-8") if isinstance(out, bytes) else str(out)

    cache = lm.backbone.init_cache(1, max_length)
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
        # A piece is held back while it ends in an incomplete UTF-8 character.
        if current.startswith(shown) and not current.endswith("\ufffd"):
            if len(current) > len(shown):
                yield current[len(shown) :]
            shown = current
        if int(token_ids[0, index]) in stop_token_ids:
            break
    if current != shown and current.startswith(shown):
        yield current[len(shown) :]
