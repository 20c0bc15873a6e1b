"""docs/methods.md is generated from the registry and the survey's list: the committed file must be current."""
from lorabench import docs_gen

SAMPLE = """## Contents
1. **Not an entry.** `x`
## Low-Rank Adaptation
### <img src="./fig/star.svg" /> Theoretical Analysis
1. **A Theory Paper.** `ICML`
   *A. B.* [[PDF](https://arxiv.org/abs/2210.05643)], 2023
<!-- 1. **Commented Example.** `x`
   [[PDF](https://arxiv.org/abs/1111.11111)] -->
## Downstream Adaptation Improving
#### Initialization Improvement
1. **PISSA: Principal singular values.** `preprint`
   *M. F.* [[PDF](https://arxiv.org/abs/2404.02948)], 2024
2. **Some Future Method** `arXiv`
   *X. Y.* 2024
## Citations
1. **Not an entry either.** `x`
"""


def test_committed_methods_md_is_current():
    expected = docs_gen.render()
    actual = docs_gen.METHODS_MD.read_text(encoding="utf-8")
    assert actual == expected, "docs/methods.md is stale: run `python -m lorabench.docs_gen`"


def test_extract_and_status():
    rows = docs_gen.extract(SAMPLE)
    assert [r["title"] for r in rows] == ["A Theory Paper", "PISSA: Principal singular values", "Some Future Method"]
    assert rows[0]["section"] == "Low-Rank Adaptation / Theoretical Analysis"
    assert rows[1]["url"] == "https://arxiv.org/abs/2404.02948" and rows[2]["url"] == ""
    by_arxiv, by_title = {}, {}
    for c in docs_gen.registered_methods():
        by_arxiv.setdefault(c.paper, []).append(c)
        by_title.setdefault(docs_gen._norm(c.title.split(":")[0]), []).append(c)
    status = [docs_gen.status_of(r, by_arxiv, by_title) for r in rows]
    assert status[0] == ("out of scope", "analysis of LoRA, not a method to run")
    assert status[1][0] == "implemented" and [c.name for c in status[1][1]] == ["pissa"]
    assert status[2] == ("planned", "")


def test_every_registered_method_appears_with_its_paper():
    text = docs_gen.METHODS_MD.read_text(encoding="utf-8")
    for c in docs_gen.registered_methods():
        assert f"| `{c.name}` |" in text
        if c.paper:
            assert c.paper in text
