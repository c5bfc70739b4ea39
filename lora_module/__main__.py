"""`python -m lora_module fit|validate|test|predict --config X.yaml`: see lora_module.cli."""

from lora_module.cli import main

if __name__ == "__main__":
    main()
