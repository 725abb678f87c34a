from dreambooth.cli import main

if __name__ == "__main__":  # not when `pretrain --workers` re-imports it in a spawned worker
    raise SystemExit(main())
