"""Chat templates in the formats of the DeepSeek family's tokenizer_config.json files (written for these tests from
the documented formats; not copies): DeepSeek-V3, R1 (think block opened by the generation prompt), V3.1 (the
`thinking` switch) and Kimi-K2. Each renders system prompts, tools, user turns, assistant turns with tool calls
and tool results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

_TOOLS = ("{%- if tools %}{{ '\\n\\n## Tools\\n' }}{%- for t in tools %}{{ '\\n### ' + t['function']['name'] + "
          "'\\n' + (t['function'] | tojson) }}{%- endfor %}{%- endif %}")

_DEEPSEEK = (
    "{{ bos_token }}{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}" + _TOOLS +
    "{%- set ns = namespace(outputs=false) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] != 'tool' and ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{%- set ns.outputs = false %}"
    "{%- endif %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{%- if m['content'] %}{{ m['content'].split('</think>')[-1] }}{%- endif %}"
    "{%- if m.get('tool_calls') %}{{ '<｜tool▁calls▁begin｜>' }}{%- for c in m['tool_calls'] %}"
    "{%- if not loop.first %}{{ '\\n' }}{%- endif %}{{ CALL }}{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}"
    "{%- endif %}{{ eos_token }}"
    "{%- elif m['role'] == 'tool' %}{%- if not ns.outputs %}{{ '<｜tool▁outputs▁begin｜>' }}"
    "{%- set ns.outputs = true %}{%- endif %}{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{%- endif %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}GEN{%- endif %}")

_V3_CALL = ("'<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] + '\\n```json\\n' + "
            "c['function']['arguments'] + '\\n```<｜tool▁call▁end｜>'")
_V31_CALL = ("'<｜tool▁call▁begin｜>' + c['function']['name'] + '<｜tool▁sep｜>' + c['function']['arguments'] + "
             "'<｜tool▁call▁end｜>'")

DEEPSEEK_V3 = _DEEPSEEK.replace("{{ CALL }}", "{{ " + _V3_CALL + " }}").replace("GEN", "")
DEEPSEEK_R1 = _DEEPSEEK.replace("{{ CALL }}", "{{ " + _V3_CALL + " }}").replace("GEN", "{{ '<think>\\n' }}")
DEEPSEEK_V31 = _DEEPSEEK.replace("{{ CALL }}", "{{ " + _V31_CALL + " }}").replace(
    "GEN", "{%- if thinking %}{{ '<think>' }}{%- else %}{{ '</think>' }}{%- endif %}")

KIMI_K2 = (
    "{%- for m in messages if m['role'] == 'system' %}{{ '<|im_system|>system<|im_middle|>' + m['content'] + "
    "'<|im_end|>' }}{%- endfor %}" + _TOOLS +
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<|im_user|>user<|im_middle|>' + m['content'] + '<|im_end|>' }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<|im_assistant|>assistant<|im_middle|>' }}"
    "{%- if m['content'] %}{{ m['content'] }}{%- endif %}"
    "{%- if m.get('tool_calls') %}{{ '<|tool_calls_section_begin|>' }}{%- for c in m['tool_calls'] %}"
    "{{ '<|tool_call_begin|>' + c['id'] + '<|tool_call_argument_begin|>' + c['function']['arguments'] + "
    "'<|tool_call_end|>' }}{%- endfor %}{{ '<|tool_calls_section_end|>' }}{%- endif %}{{ '<|im_end|>' }}"
    "{%- elif m['role'] == 'tool' %}{{ '<|im_system|>tool<|im_middle|>## Return of ' + m['tool_call_id'] + "
    "'\\n' + m['content'] + '<|im_end|>' }}"
    "{%- elif m['role'] != 'system' %}{{ raise_exception('unsupported role: ' + m['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{%- endif %}")

FAMILY = {"deepseek_v3": DEEPSEEK_V3, "deepseek_r1": DEEPSEEK_R1, "deepseek_v31": DEEPSEEK_V31, "kimi_k2": KIMI_K2}


def checkpoint_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of checkpoint `src` (weights linked, not copied) whose tokenizer_config.json has `template`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "tokenizer_config.json":
            conf = json.loads(f.read_text())
            conf["chat_template"] = template
            (dst / f.name).write_text(json.dumps(conf))
        elif f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst
