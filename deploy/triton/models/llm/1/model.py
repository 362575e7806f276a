"""An instruction-tuned LLM on CPU for Triton's Python backend: a GGUF file
run by llama.cpp (llama-cpp-python), with the interface of Triton's vLLM
deployments, so rag-grpc talks to it exactly as to a GPU Triton.

The prompt rag-grpc sends (numbered passages, the question) is the user
message; the GGUF's own chat template puts it, after a system message, into
the model's format. Generation streams one response per piece of text, and
the last response carries ``num_input_tokens``, ``num_output_tokens`` and
``finish_reason`` ("stop", "length" or "cancelled").

Set in the Triton process's environment, read once at load:

- ``RAG_LLM_MODEL_PATH``: the GGUF file (deploy/triton/weights.py fetches one).
- ``RAG_LLM_MODEL_SHA256``: its expected hash. The model refuses to load
  unless the file matches: weights are executable input to a C++ parser.
- ``RAG_LLM_INSTANCES`` (1): llama.cpp contexts, each answering one request
  at a time on its own thread. They share one memory-mapped copy of the
  weights; each costs its KV cache (``RAG_LLM_CTX`` tokens).
- ``RAG_LLM_THREADS`` (the CPU count divided among the instances): threads
  per context.
- ``RAG_LLM_CTX`` (4096): context length in tokens; a longer prompt is
  refused with INVALID_ARG.
- ``RAG_LLM_MAX_QUEUE`` (8): requests waiting for a free context. Past it a
  request fails at once with a message starting ``RESOURCE_EXHAUSTED:``
  (the Python backend has no such status code; rag-grpc maps the prefix).
  A request it cannot serve (a prompt longer than the context, malformed
  sampling parameters) fails with a message starting ``INVALID_ARGUMENT:``.
- ``RAG_LLM_SYSTEM_PROMPT``: the system message.

Per request (``sampling_parameters`` JSON as vLLM takes it, or the tensors
``max_tokens``, ``temperature``, ``top_p``): max_tokens (default 256),
temperature (default 0: greedy, so answers are reproducible), top_p, stop
(list of strings), seed, repetition_penalty (default 1.1), ignore_eos (as
vLLM: go on to max_tokens), and cite (ours): when true, decoding is held to a
grammar in which the answer is one to three sentences, each ending ". [n]"
with n one of the passages numbered "[n] " at the start of a line of the
prompt (rag-grpc's template). The model still chooses the words and which
passage to cite; it cannot leave the citation out. Small models otherwise
write [n] in about one answer in ten (bench/answers.py).

Prompt reuse: each context keeps the tokens it last evaluated, and
llama.cpp evaluates only what follows the longest common prefix, so the
template and the system message are computed once per context.

Cancellation: a request cancelled while queued is dropped when a context
takes it; one cancelled while generating stops at the next token (prompt
evaluation, which runs in llama.cpp batches, finishes first). Metrics on
Triton's metrics port: llm_active_requests, llm_queued_requests (gauges),
llm_cancelled_total, llm_rejected_total (counters).
"""

import hashlib
import json
import os
import queue
import re
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's question from the numbered "
    "context passages they give you, and cite the passages you use as [n]."
)


PASSAGE_LINE = re.compile(r"^\[(\d+)\] ", re.M)


def citation_grammar(prompt):
    """GBNF for "sentence. [n]" up to three times, n a passage of the prompt;
    None when the prompt numbers no passages. A period followed by a space
    ends a sentence only as ". [n]", so the model cannot skip the citation;
    other periods (0.01, str.lower) stay free."""
    numbers = sorted({int(n) for n in PASSAGE_LINE.findall(prompt)})
    if not numbers:
        return None
    choices = " | ".join(f'"{n}"' for n in numbers)
    return (
        'root ::= sentence (" " sentence)? (" " sentence)?\n'
        'sentence ::= words ". [" number "]"\n'
        'words ::= ([^\\[\\]\\n.] | "." [^ \\n\\[\\]])+\n'
        f"number ::= {choices}\n"
    )


def sha256_of(path):
    """The file's hex sha256, as weights.py's sha256_file computes it: a model
    directory is deployed on its own, so it imports nothing of ours."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _int_env(name, default, low, high):
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside {low}..{high}")
    return value


def _text_tensor(name, text):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _count_tensor(name, value):
    return pb_utils.Tensor(name, np.array([value], dtype=np.uint32))


class _Stopped(Exception):
    """The client cancelled the request."""


class TritonPythonModel:
    def initialize(self, args):
        from llama_cpp import Llama, LlamaGrammar, StoppingCriteriaList
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = os.environ.get("RAG_LLM_MODEL_PATH", "")
        expected = os.environ.get("RAG_LLM_MODEL_SHA256", "").strip().lower()
        if not path or not os.path.isfile(path):
            raise ValueError(
                f"llm: RAG_LLM_MODEL_PATH={path!r} is not a file; fetch weights with "
                "deploy/triton/weights.py fetch NAME and set it to the printed path"
            )
        if len(expected) != 64:
            raise ValueError(
                "llm: RAG_LLM_MODEL_SHA256 must be the file's expected sha256 (64 hex "
                "digits); the model refuses weights it cannot check"
            )
        actual = sha256_of(path)
        if actual != expected:
            raise ValueError(
                f"llm: refusing {path}: its sha256 is {actual}, expected {expected} "
                "(a corrupt or substituted file; fetch it again with deploy/triton/weights.py)"
            )
        instances = _int_env("RAG_LLM_INSTANCES", 1, 1, 64)
        threads = _int_env("RAG_LLM_THREADS", max(1, (os.cpu_count() or 1) // instances), 1, 1024)
        self.criteria = StoppingCriteriaList
        self.grammar = LlamaGrammar
        self.n_ctx = _int_env("RAG_LLM_CTX", 4096, 256, 131072)
        max_queue = _int_env("RAG_LLM_MAX_QUEUE", 8, 0, 100000)
        self.system_prompt = os.environ.get("RAG_LLM_SYSTEM_PROMPT", SYSTEM_PROMPT)

        self.contexts = [
            Llama(
                model_path=path,
                n_ctx=self.n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
            for _ in range(instances)
        ]
        first = self.contexts[0]
        template = first.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"llm: {path} carries no chat template (tokenizer.chat_template)")
        eos = first.token_eos()
        bos = first.token_bos()
        # The tokens that end a turn: end of sequence, and the template's stop
        # token when it is another one (Qwen's and SmolLM2's <|im_end|>).
        self.end_tokens = {eos}
        for text in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            ids = first.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:
                self.end_tokens.add(ids[0])
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=first._model.token_get_text(eos) if eos != -1 else "",
            bos_token=first._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

        labels = {"model": json.loads(args["model_config"])["name"]}
        # The families must outlive their metrics, so they are kept here.
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=kind)
            for name, description, kind in [
                ("llm_active_requests", "Requests generating now", pb_utils.MetricFamily.GAUGE),
                (
                    "llm_queued_requests",
                    "Requests waiting for a free context",
                    pb_utils.MetricFamily.GAUGE,
                ),
                (
                    "llm_cancelled_total",
                    "Requests stopped because the client cancelled them",
                    pb_utils.MetricFamily.COUNTER,
                ),
                (
                    "llm_rejected_total",
                    "Requests refused because the queue was full",
                    pb_utils.MetricFamily.COUNTER,
                ),
            ]
        }
        self.metrics = {name: f.Metric(labels=labels) for name, f in self.families.items()}
        self.lock = threading.Lock()
        self.limit = instances + max_queue
        self.admitted = 0  # generating or waiting
        self.running = 0
        self.pending = queue.Queue()
        self.workers = [
            threading.Thread(target=self._work, args=(llm,), name=f"llm-{i}", daemon=True)
            for i, llm in enumerate(self.contexts)
        ]
        for worker in self.workers:
            worker.start()

    # -- scheduling -----------------------------------------------------------

    def execute(self, requests):
        """Queue each request for the next free context and return at once:
        Triton's scheduler never holds a request, so the bound here is the
        only queue."""
        for request in requests:
            sender = request.get_response_sender()
            with self.lock:
                accepted = self.admitted < self.limit
                if accepted:
                    self.admitted += 1
                    self.pending.put((request, sender))
                    self._gauges()
            if accepted:
                continue
            self.metrics["llm_rejected_total"].increment(1)
            error = pb_utils.TritonError(
                f"RESOURCE_EXHAUSTED: llm has {len(self.contexts)} contexts busy and "
                f"{self.limit - len(self.contexts)} requests waiting (RAG_LLM_MAX_QUEUE); "
                "retry later"
            )
            sender.send(
                pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None

    def _gauges(self):
        self.metrics["llm_active_requests"].set(self.running)
        self.metrics["llm_queued_requests"].set(self.admitted - self.running)

    def _work(self, llm):
        while True:
            item = self.pending.get()
            if item is None:
                return
            with self.lock:
                self.running += 1
                self._gauges()
            try:
                self._answer(llm, *item)
            finally:
                with self.lock:
                    self.running -= 1
                    self.admitted -= 1
                    self._gauges()

    def finalize(self):
        for _ in self.workers:
            self.pending.put(None)
        for worker in self.workers:
            worker.join(timeout=30)

    # -- one request ------------------------------------------------------------

    def _inputs(self, request):
        def scalar(name, default):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else tensor.as_numpy().reshape(-1)[0]

        def text(value):
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)

        prompt = text(scalar("text_input", b""))
        raw = scalar("sampling_parameters", None)
        params = json.loads(text(raw)) if raw is not None else {}
        if not isinstance(params, dict):
            raise ValueError("sampling_parameters must be a JSON object")
        stop = params.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        options = {
            "max_tokens": int(params.get("max_tokens", scalar("max_tokens", 256))),
            "temperature": float(params.get("temperature", scalar("temperature", 0.0))),
            "top_p": float(params.get("top_p", scalar("top_p", 1.0))),
            "repeat_penalty": float(params.get("repetition_penalty", 1.1)),
            "stop": stop,
        }
        if options["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be at least 1, got {options['max_tokens']}")
        if params.get("seed") is not None:
            options["seed"] = int(params["seed"])
        if params.get("cite"):
            grammar = citation_grammar(prompt)
            if grammar is not None:
                options["grammar"] = self.grammar.from_string(grammar, verbose=False)
        return prompt, options, bool(params.get("ignore_eos", False)), bool(scalar("stream", True))

    def _answer(self, llm, request, sender):
        if sender.is_cancelled():
            self.metrics["llm_cancelled_total"].increment(1)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        prompt_tokens = 0
        generated = [0]
        pieces = []
        try:
            prompt, options, ignore_eos, stream = self._inputs(request)
            chat = self.formatter(
                messages=[
                    {"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": prompt},
                ]
            )
            tokens = llm.tokenize(chat.prompt.encode("utf-8"), add_bos=True, special=True)
            prompt_tokens = len(tokens)
            if prompt_tokens + 1 > self.n_ctx:
                raise ValueError(
                    f"the prompt is {prompt_tokens} tokens; the context holds {self.n_ctx} "
                    "(RAG_LLM_CTX); send fewer or shorter passages"
                )
            options["max_tokens"] = min(options["max_tokens"], self.n_ctx - prompt_tokens)
            stops = list(options.pop("stop"))
            if ignore_eos:
                # As vLLM's ignore_eos: generate max_tokens whatever the model
                # would end with (benchmarks and tests of long answers).
                options["logit_bias"] = {token: -1e9 for token in self.end_tokens}
            elif isinstance(chat.stop, str):
                stops.append(chat.stop)
            elif chat.stop:
                stops.extend(chat.stop)

            def keep_going(input_ids, logits):
                # Called for each sampled token before it joins input_ids:
                # it counts (an end-of-turn token included: it was computed).
                generated[0] = len(input_ids) - prompt_tokens + 1
                if sender.is_cancelled():
                    raise _Stopped
                return False

            finish = "length"
            for chunk in llm.create_completion(
                prompt=tokens,
                stream=True,
                stop=stops,
                stopping_criteria=self.criteria([keep_going]),
                **options,
            ):
                choice = chunk["choices"][0]
                piece = choice.get("text") or ""
                if piece:
                    if stream:
                        sender.send(
                            pb_utils.InferenceResponse([_text_tensor("text_output", piece)])
                        )
                    else:
                        pieces.append(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        except _Stopped:
            self.metrics["llm_cancelled_total"].increment(1)
            finish = "cancelled"
        except Exception as exc:  # report it to the client, never hang the stream
            # A stream's error reaches the client as its message alone, so a
            # refused request says so in words, as the queue bound does.
            if isinstance(exc, ValueError):
                error = pb_utils.TritonError(
                    f"INVALID_ARGUMENT: llm refused the request: {exc}",
                    pb_utils.TritonError.INVALID_ARG,
                )
            else:
                error = pb_utils.TritonError(f"llm failed: {exc}")
            sender.send(
                pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
            return
        last = [
            _text_tensor("text_output", "".join(pieces)),
            _count_tensor("num_input_tokens", prompt_tokens),
            _count_tensor("num_output_tokens", generated[0]),
            _text_tensor("finish_reason", finish),
        ]
        sender.send(
            pb_utils.InferenceResponse(last), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )
