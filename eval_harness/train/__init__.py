"""The trainers, one module per recipe (``prefix``: ``train``, ``av_lora``: ``train-av-lora``, ``ar``:
``train-ar``, ``grpo``: ``train-grpo``, ``patch``: ``train-patch``), on the shared run folder
(``run_folder``, ``loop``) and LoRA/injection helpers (``common``)."""
