"""A small extractive "LLM" for Triton's Python backend, with the interface of
Triton's vLLM and TensorRT-LLM deployments, for rag-grpc's tests and demo.

It reads the numbered context passages and the question from a rag-grpc
prompt, and answers with the sentences that share most words with the
question, each followed by its citation [n], one word ("token") at a time.
Decoupled (model rag_llm): every word is its own response, sent as produced,
and a cancelled request stops at the next word. Not decoupled
(rag_llm_sync): one response with the whole text.

Knobs: max_tokens, and in the sampling_parameters JSON (as vLLM takes it)
``ignore_eos`` (keep going until max_tokens, cycling through the passages).
The environment variable RAG_LLM_TOKEN_DELAY_MS (default 5) sets the time
per word, standing in for a GPU's decode step.

Custom metrics on Triton's metrics endpoint: rag_llm_active_requests (gauge)
and rag_llm_cancelled_total (counter).
"""

import json
import os
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

DELAY_S = float(os.environ.get("RAG_LLM_TOKEN_DELAY_MS", "5")) / 1000
PASSAGE = re.compile(r"^\[(\d+)\]\s*(.*)$")
WORD = re.compile(r"[a-z0-9]+")


def parse_prompt(prompt):
    """(question, [(n, text)]) from rag-grpc's prompt template."""
    passages, question = [], ""
    for line in prompt.splitlines():
        match = PASSAGE.match(line.strip())
        if match:
            passages.append((int(match.group(1)), match.group(2)))
        elif line.startswith("Question:"):
            question = line[len("Question:") :].strip()
    return question, passages


def answer_words(prompt, ignore_eos):
    """The answer, word by word: best-matching sentences first, each cited."""
    question, passages = parse_prompt(prompt)
    wanted = set(WORD.findall(question.lower()))
    sentences = []
    for n, text in passages:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if sentence.strip():
                overlap = len(wanted & set(WORD.findall(sentence.lower())))
                sentences.append((overlap, -n, sentence.strip(), n))
    sentences.sort(reverse=True)
    chosen = sentences[:3] or [(0, 0, "I have no context to answer from.", 0)]
    while True:
        for _, _, sentence, n in chosen:
            words = sentence.split()
            if n:
                words[-1] = f"{words[-1]} [{n}]"
            yield from words
        if not ignore_eos:
            return


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.active = 0
        self.lock = threading.Lock()
        labels = {"model": config["name"]}
        # The families must outlive their metrics, so they are kept here.
        self.active_family = pb_utils.MetricFamily(
            name="rag_llm_active_requests",
            description="Requests generating now",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.cancelled_family = pb_utils.MetricFamily(
            name="rag_llm_cancelled_total",
            description="Requests stopped because the client cancelled them",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.active_gauge = self.active_family.Metric(labels=labels)
        self.cancelled = self.cancelled_family.Metric(labels=labels)

    def execute(self, requests):
        if not self.decoupled:
            return [self._whole(request) for request in requests]
        for request in requests:
            self._stream(request)
        return None

    def _inputs(self, request):
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)

        def scalar(name, default):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else tensor.as_numpy().reshape(-1)[0]

        params = {}
        raw = scalar("sampling_parameters", None)
        if raw is not None:
            params = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        max_tokens = int(params.get("max_tokens", scalar("max_tokens", 64)))
        stream = bool(scalar("stream", True))
        return prompt, max_tokens, stream, bool(params.get("ignore_eos", False))

    def _words(self, prompt, max_tokens, ignore_eos):
        for i, word in enumerate(answer_words(prompt, ignore_eos)):
            if i >= max_tokens:
                return
            if DELAY_S:
                time.sleep(DELAY_S)
            yield ("" if i == 0 else " ") + word

    def _whole(self, request):
        prompt, max_tokens, _, ignore_eos = self._inputs(request)
        text = "".join(self._words(prompt, max_tokens, ignore_eos))
        return pb_utils.InferenceResponse([_text_tensor(text)])

    def _stream(self, request):
        sender = request.get_response_sender()
        with self.lock:
            self.active += 1
            self.active_gauge.set(self.active)
        try:
            prompt, max_tokens, stream, ignore_eos = self._inputs(request)
            pieces = []
            for piece in self._words(prompt, max_tokens, ignore_eos):
                if sender.is_cancelled():
                    self.cancelled.increment(1)
                    break
                if stream:
                    sender.send(pb_utils.InferenceResponse([_text_tensor(piece)]))
                else:
                    pieces.append(piece)
            else:
                if not stream:
                    sender.send(pb_utils.InferenceResponse([_text_tensor("".join(pieces))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # report it to the client, never hang the stream
            error = pb_utils.TritonError(f"rag_llm failed: {exc}")
            sender.send(pb_utils.InferenceResponse(error=error))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            with self.lock:
                self.active -= 1
                self.active_gauge.set(self.active)


def _text_tensor(text):
    return pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
