#!/usr/bin/env python3
"""Build the bundled Sporting Clube Farense Q&A sample dataset (European Portuguese).

Every answer below is taken from the facts in FACTS and nothing else (their source,
public encyclopedia articles, is noted above FACTS). Each fact holds several question phrasings, one or two answer
phrasings (kept close in wording so a small model can memorise them) and the
keywords that any correct answer must contain; the fact-recall metric counts an
answer as correct when it contains every keyword (case- and accent-insensitive).

The script expands facts x questions x answers, shuffles with random.Random(0)
and splits about 90/10 by question: a validation question never appears in
train, but its fact always has other phrasings there, so validation measures
recall of learned facts asked in new words. Validation loss and the preset sweep
used val.jsonl, so it helped choose settings.

test.jsonl comes from each item's separate `test` phrasings, drawn from their own
seeded stream after train/val are built (so those two files do not change when a
test phrasing is added). It is for reported figures only: one line per test
question, with one of the item's fixed answers and its keywords; no test question
is a train or val question even after folding case, accents and punctuation.

Usage, from the repository root:  python3 data/farense/build_dataset.py [OUT_DIR]
(OUT_DIR defaults to afinar/bundled/farense/, which data/farense/ links to). Standard library only; the output is
byte-identical on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

# The data ship inside the package (afinar/bundled/farense/); data/farense/ links to them.
OUT_DIR = Path(__file__).resolve().parents[2] / "afinar" / "bundled" / "farense"
SEED = 0
VAL_FRACTION = 0.10
MIN_TOTAL = 600
MIN_VAL = 60
MIN_QUESTIONS = 5
MAX_ANSWER_WORDS = 40
TEST_SEED = 1  # its own stream: the test split never moves train/val
MIN_TEST, MAX_TEST = 80, 100

# Fixed templates: a tiny model learns one wording per behaviour.
DECLINE = "Lamento, só posso responder a perguntas sobre o Sporting Clube Farense."
UNKNOWN = "Lamento, não tenho essa informação sobre o Sporting Clube Farense."


@dataclass(frozen=True)
class Fact:
    """One thing the model should know (or one kind of question to decline)."""

    id: str
    kind: str  # "fact" (from the sheet), "unknown" (club, not on the sheet), "decline" (off topic)
    questions: tuple[str, ...]  # train and val
    answers: tuple[str, ...]
    keywords: tuple[str, ...]
    test: tuple[str, ...] = ()  # held-out phrasings for test.jsonl only


def fact(id, questions, answers, keywords, test=()):
    return Fact(id, "fact", tuple(questions), tuple(answers), tuple(keywords), tuple(test))


def unknown(id, questions, test=()):
    return Fact(id, "unknown", tuple(questions), (UNKNOWN,), ("não tenho essa informação",), tuple(test))


def decline(id, questions, test=()):
    return Fact(id, "decline", tuple(questions), (DECLINE,), ("só posso responder",), tuple(test))


# Source: every fact below was transcribed from the project's fact sheet ("the sheet" in
# the comments), whose source note reads: "Facts gathered from public encyclopedia
# articles (English, German and Portuguese editions agree on each line below)." Where a
# fact changes over time, the sheet gives its date. Do not add a fact from anywhere else:
# a wrong fact in a training set is a bug.
FACTS: list[Fact] = [
    # ---------------------------------------------------------------- Identidade
    fact(
        "apresentacao",
        [
            "O que é o Farense?",
            "Fala-me do Farense.",
            "O que é o Sporting Clube Farense?",
            "quem sao os leoes de faro",
            "Conheces o SC Farense?",
            "Podes apresentar o Farense em poucas palavras?",
            "farense o que e",
            "Que clube é o Farense?",
        ],
        [
            "O Sporting Clube Farense é um clube de futebol de Faro, no Algarve, fundado a 1 de abril de 1910.",
            "O Farense é um clube de futebol de Faro, no Algarve, fundado a 1 de abril de 1910.",
        ],
        ["Faro", "1910"],
        test=[
            "Diz-me o que é o Farense, por favor.",
            "ja ouvi falar do farense, que clube e esse?",
        ],
    ),
    fact(
        "nome_completo",
        [
            "Qual é o nome completo do Farense?",
            "Como se chama oficialmente o Farense?",
            "qual o nome oficial do farense",
            "Farense é a abreviatura de quê?",
            "Qual é o nome verdadeiro do clube Farense?",
            "nome completo do farense?",
            "O Farense chama-se mesmo só Farense?",
            "Qual é a designação oficial dos Leões de Faro?",
        ],
        [
            "O nome completo do clube é Sporting Clube Farense, conhecido simplesmente por Farense.",
            "Chama-se Sporting Clube Farense, mas é conhecido simplesmente por Farense.",
        ],
        ["Sporting Clube Farense"],
        test=[
            "Como se chama o Farense por extenso?",
            "o farense tem um nome mais comprido?",
        ],
    ),
    fact(
        "cidade",
        [
            "De que cidade é o Farense?",
            "Onde fica o Sporting Clube Farense?",
            "o farense e de onde",
            "Em que região de Portugal joga o Farense?",
            "O SC Farense é de que distrito?",
            "farense é do algarve?",
            "Qual é a cidade do Sporting Clube Farense?",
            "Onde é que fica o Farense?",
        ],
        [
            "O Sporting Clube Farense é de Faro, capital do distrito de Faro, no Algarve, no sul de Portugal.",
            "O Farense é de Faro, capital do distrito de Faro, no Algarve.",
        ],
        ["Faro", "Algarve"],
        test=[
            "Sabe dizer-me de que terra é o Farense?",
            "o farense e de que cidade do algarve",
        ],
    ),
    fact(
        "fundacao",
        [
            "Quando foi fundado o Farense?",
            "Em que ano foi fundado o Sporting Clube Farense?",
            "quando nasceu o farense",
            "Qual é a data de fundação do SC Farense?",
            "Em que dia foi fundado o Farense?",
            "ano de fundacao do farense?",
            "Desde quando existe o Farense?",
            "Os Leões de Faro foram fundados em que ano?",
            "Quando é que o Farense foi criado?",
        ],
        [
            "O Sporting Clube Farense foi fundado a 1 de abril de 1910.",
            "O Farense foi fundado a 1 de abril de 1910.",
        ],
        ["1 de abril", "1910"],
        test=[
            "O Farense nasceu em que dia, mês e ano?",
            "em que ano apareceu o sc farense",
        ],
    ),
    fact(
        "antiguidade",
        [
            "O Farense é um clube antigo?",
            "O Farense é um dos clubes mais antigos do Algarve?",
            "o farense e um clube historico?",
            "É verdade que o Farense é um dos clubes mais tradicionais do Algarve?",
            "Que lugar ocupa o Farense na história do futebol algarvio?",
            "farense clube antigo ou recente?",
            "O Sporting Clube Farense tem muita história?",
            "Qual é a tradição do SC Farense no Algarve?",
        ],
        [
            "Fundado em 1910, o Sporting Clube Farense é um dos clubes mais antigos e tradicionais do Algarve.",
            "O Farense, fundado em 1910, é um dos clubes mais antigos e tradicionais do Algarve.",
        ],
        ["1910", "mais antigos"],
        test=[
            "Comparado com outros clubes algarvios, o Farense é antigo?",
            "farense tem muitos anos de historia?",
        ],
    ),
    fact(
        "filial_sporting",
        [
            "Qual é a ligação do Farense ao Sporting?",
            "O Farense tem alguma relação com o Sporting Clube de Portugal?",
            "O Farense foi filial do Sporting?",
            "farense é filial do sporting?",
            "Que número de filial do Sporting era o Farense?",
            "o farense tem ligacao ao sporting",
            "Os Leões de Faro foram filial de que clube?",
            "Que relação há entre o SC Farense e o Sporting?",
        ],
        [
            "O Sporting Clube Farense foi a filial n.º 2 do Sporting Clube de Portugal.",
            "O Farense foi a filial n.º 2 do Sporting Clube de Portugal.",
        ],
        ["filial n.º 2", "Sporting Clube de Portugal"],
        test=[
            "O SC Farense era filial do Sporting? Com que número?",
            "O Farense já foi uma filial do Sporting Clube de Portugal?",
        ],
    ),
    fact(
        "equipamento_stromp",
        [
            "Em que se inspirou o equipamento do Farense?",
            "De onde vem o equipamento do Farense?",
            "O que é o equipamento Stromp do Farense?",
            "Porque é que a camisola do Farense lembra a do Sporting antigo?",
            "equipamento do farense inspirado em que?",
            "Qual é a origem do equipamento principal do SC Farense?",
            "O equipamento do Farense tem a ver com o Sporting?",
            "Que equipamento do Sporting inspirou o Farense?",
        ],
        [
            "O equipamento principal do Farense inspirou-se no equipamento Stromp, que o Sporting usou até 1928.",
            "Inspirou-se no equipamento Stromp, usado pelo Sporting até 1928.",
        ],
        ["Stromp", "1928"],
        test=[
            "O equipamento dos Leões de Faro foi inspirado em quê?",
            "de onde vem a inspiracao da camisola do farense",
        ],
    ),
    fact(
        "alcunha",
        [
            "Qual é a alcunha do Farense?",
            "Como é conhecida a equipa do Farense?",
            "alcunha do farense",
            "O Farense tem alguma alcunha?",
            "Que nome carinhoso se dá ao Farense?",
            "qual e a alcunha do sporting clube farense",
            "Como é que também se chama ao SC Farense?",
            "Os adeptos chamam o quê ao Farense?",
        ],
        [
            "A alcunha do Farense é «Leões de Faro».",
            "O Sporting Clube Farense é conhecido pela alcunha «Leões de Faro».",
        ],
        ["Leões de Faro"],
        test=[
            "Que alcunha tem o SC Farense?",
            "como e que chamam ao farense",
        ],
    ),
    fact(
        "cores",
        [
            "Quais são as cores do Farense?",
            "De que cores é o Farense?",
            "cores do farense",
            "O Farense joga de que cores?",
            "Quais as cores oficiais do Sporting Clube Farense?",
            "O Farense é verde e branco como o Sporting?",
            "que cores usa o sc farense",
            "Quais são as cores dos Leões de Faro?",
        ],
        [
            "As cores do Sporting Clube Farense são o preto e o branco.",
            "As cores do Farense são o preto e o branco.",
        ],
        ["preto", "branco"],
        test=[
            "Que cores representam o Sporting Clube Farense?",
            "o farense e preto e branco?",
        ],
    ),
    fact(
        "sitio_oficial",
        [
            "Qual é o sítio oficial do Farense?",
            "Qual é o site do Farense?",
            "site oficial do farense",
            "Onde encontro o Farense na internet?",
            "Qual é o endereço da página oficial do SC Farense?",
            "o farense tem site?",
            "Qual é o website do Sporting Clube Farense?",
            "Onde posso ver informação oficial dos Leões de Faro online?",
        ],
        [
            "O sítio oficial do Sporting Clube Farense é scfarense.pt.",
            "O sítio oficial do Farense é scfarense.pt.",
        ],
        ["scfarense.pt"],
        test=[
            "Qual é a página oficial do Farense na internet?",
            "tens o link do site do farense?",
        ],
    ),
    # ------------------------------------------------------------------- Estádio
    fact(
        "estadio_historico",
        [
            "Qual é o estádio histórico do Farense?",
            "Onde jogava o Farense antes de 2004?",
            "Em que estádio jogou o Farense desde a fundação?",
            "estadio historico do farense",
            "Qual foi a casa do Sporting Clube Farense até 2004?",
            "Onde é que o Farense jogava em casa no século passado?",
            "Qual era o estádio dos Leões de Faro antes do Estádio Algarve?",
            "onde jogava o farense antigamente",
        ],
        [
            "O estádio histórico do Farense é o Estádio de São Luís, em Faro, que foi a casa do clube de 1910 a 2004.",
            "O Farense jogou no Estádio de São Luís, em Faro, de 1910 a 2004.",
        ],
        ["São Luís", "1910", "2004"],
        test=[
            "Qual foi o primeiro estádio do Farense?",
            "Em que estádio jogava o Farense nos anos 1990?",
        ],
    ),
    fact(
        "anos_sao_luis",
        [
            "Quantos anos jogou o Farense no Estádio de São Luís até 2004?",
            "Durante quanto tempo foi o São Luís a casa do Farense antes da mudança de 2004?",
            "quantos anos esteve o farense no sao luis ate 2004",
            "Por quantos anos jogou o SC Farense no São Luís antes de sair em 2004?",
            "Quanto tempo durou a primeira passagem do Farense pelo Estádio de São Luís?",
            "o farense jogou muitos anos no são luís antes de 2004?",
            "Quantos anos seguidos jogaram os Leões de Faro no São Luís desde 1910?",
        ],
        [
            "O Estádio de São Luís foi a casa do Farense durante 94 anos, de 1910 a 2004.",
            "O Farense jogou no Estádio de São Luís durante 94 anos, de 1910 a 2004.",
        ],
        ["94 anos"],
        test=[
            "O Farense ficou quantos anos no Estádio de São Luís antes de se mudar para o Estádio Algarve?",
        ],
    ),
    fact(
        "mudanca_estadio_algarve",
        [
            "Para onde se mudou o Farense em 2004?",
            "Em que estádio passou o Farense a jogar em 2004?",
            "Onde jogou o Farense depois de sair do São Luís?",
            "O Farense mudou de estádio em 2004?",
            "quando foi o farense para o estadio algarve",
            "Em que ano se mudou o Sporting Clube Farense para o Estádio Algarve?",
            "O Farense jogou no Estádio Algarve?",
            "Que estádio substituiu o São Luís em 2004?",
        ],
        [
            "Em 2004, o Farense mudou-se para o Estádio Algarve, construído para o Euro 2004.",
            "Em 2004, o Farense deixou o Estádio de São Luís e mudou-se para o Estádio Algarve.",
        ],
        ["2004", "Estádio Algarve"],
        test=[
            "Em 2004 o Farense trocou de estádio. Para qual?",
            "qual foi o estadio novo do farense em 2004",
        ],
    ),
    fact(
        "estadio_algarve_euro",
        [
            "Para que foi construído o Estádio Algarve?",
            "Porque foi construído o Estádio Algarve?",
            "o estadio algarve foi feito para o euro?",
            "Para que prova se construiu o estádio para onde o Farense foi em 2004?",
            "Para que competição se construiu o Estádio Algarve?",
            "O Estádio Algarve foi construído para que torneio da UEFA?",
            "estádio algarve euro 2004?",
        ],
        [
            "O Estádio Algarve foi construído para o Euro 2004, da UEFA. O Farense mudou-se para lá em 2004.",
            "O Estádio Algarve foi construído para o Euro 2004.",
        ],
        ["Euro 2004"],
        test=[
            "Que torneio esteve na origem da construção do Estádio Algarve?",
        ],
    ),
    fact(
        # The sheet dates the return (2013); it does not say "still today", so the
        # answer to "which stadium" is the dated return, not a present-tense claim.
        "regresso_sao_luis",
        [
            "Quando voltou o Farense ao Estádio de São Luís?",
            "O Farense regressou ao São Luís?",
            "Em que ano é que o Farense voltou a jogar no São Luís?",
            "quando regressou o farense ao sao luis",
            "O SC Farense deixou o Estádio Algarve?",
            "Qual é o estádio do Farense?",
            "Em que estádio joga o Farense?",
            "Onde jogam os Leões de Faro em casa?",
            "O Estádio de São Luís foi renovado?",
        ],
        [
            "O Farense regressou ao Estádio de São Luís em 2013, depois de subir à Segunda Liga, e o estádio foi então renovado.",
            "Em 2013, o Farense voltou ao Estádio de São Luís, que foi então renovado.",
        ],
        ["São Luís", "2013"],
        test=[
            "O Farense voltou a jogar no Estádio de São Luís depois do Estádio Algarve?",
            "em que ano regressaram os leoes de faro ao sao luis",
        ],
    ),
    # ------------------------------------------------ Melhor classificação e Europa
    fact(
        "melhor_classificacao",
        [
            "Qual foi a melhor classificação de sempre do Farense?",
            "Qual é a melhor posição do Farense na Primeira Liga?",
            "melhor classificacao do farense no campeonato",
            "Em que lugar ficou o Farense na época 1994-95?",
            "Qual foi a melhor época de sempre do SC Farense no campeonato?",
            "Até onde já chegou o Farense no campeonato?",
            "qual o melhor lugar que o farense ja fez na primeira liga?",
            "Em que época fizeram os Leões de Faro a sua melhor classificação?",
        ],
        [
            "A melhor classificação de sempre do Farense foi o 5.º lugar na Primeira Liga, na época 1994-95.",
            "O Farense terminou em 5.º lugar na Primeira Liga em 1994-95, a sua melhor classificação de sempre.",
        ],
        ["5.º lugar", "1994-95"],
        test=[
            "Qual foi a classificação mais alta do Farense na Primeira Liga?",
            "em que epoca ficou o farense mais acima na tabela",
        ],
    ),
    fact(
        # Derived from the sheet: the best league finish is 5.º, so never champion.
        "nunca_campeao_primeira_liga",
        [
            "O Farense já foi campeão da Primeira Liga?",
            "O Farense alguma vez ganhou a Primeira Liga?",
            "farense ja ganhou a primeira liga?",
            "Os Leões de Faro já foram campeões da primeira divisão?",
            "O SC Farense já venceu o campeonato da Primeira Liga?",
            "O Farense já ganhou a liga portuguesa?",
            "farense campeao da primeira liga alguma vez",
        ],
        [
            "Não. A melhor classificação do Farense na Primeira Liga foi o 5.º lugar, em 1994-95.",
        ],
        ["5.º lugar", "1994-95"],
        test=[
            "O Sporting Clube Farense já conquistou o título da Primeira Liga?",
        ],
    ),
    fact(
        "primeira_europa",
        [
            "Quando jogou o Farense pela primeira vez na Europa?",
            "O Farense já jogou nas competições europeias?",
            "Qual foi a primeira prova europeia do Farense?",
            "farense na taça uefa",
            "O Sporting Clube Farense já participou na Taça UEFA?",
            "os leoes de faro ja jogaram na europa?",
            "Em que época se estreou o Farense nas provas da UEFA?",
            "Qual foi a estreia europeia do SC Farense?",
        ],
        [
            "A primeira presença do Farense numa prova europeia foi na Taça UEFA 1995-96.",
            "O Farense estreou-se nas provas europeias na Taça UEFA 1995-96.",
        ],
        ["Taça UEFA", "1995-96"],
        test=[
            "Qual foi a primeira participação europeia dos Leões de Faro?",
            "quando e que o farense foi a europa pela primeira vez",
        ],
    ),
    fact(
        "qualificacao_uefa",
        [
            "Como se qualificou o Farense para a Taça UEFA?",
            "Porque é que o Farense jogou a Taça UEFA em 1995-96?",
            "O que levou o Farense à Europa?",
            "como o farense chegou a taça uefa",
            "Que classificação valeu ao SC Farense a ida à Taça UEFA?",
            "Graças a quê jogou o Farense na Europa?",
            "farense foi a europa porque?",
        ],
        [
            "O 5.º lugar na Primeira Liga em 1994-95 deu ao Farense a sua primeira presença europeia, na Taça UEFA 1995-96.",
            "O Farense qualificou-se para a Taça UEFA 1995-96 graças ao 5.º lugar na Primeira Liga em 1994-95.",
        ],
        ["5.º lugar", "Taça UEFA"],
        test=[
            "Que resultado no campeonato levou o Farense à Taça UEFA?",
            "Como é que os Leões de Faro conseguiram ir à Europa?",
        ],
    ),
    fact(
        "eliminado_uefa",
        [
            "Quem eliminou o Farense da Taça UEFA?",
            "Contra quem jogou o Farense na Taça UEFA 1995-96?",
            "O Farense jogou contra o Lyon?",
            "até onde chegou o farense na taça uefa",
            "Em que eliminatória caiu o Farense na Taça UEFA?",
            "Qual foi o adversário europeu do Sporting Clube Farense?",
            "farense vs lyon",
            "Que equipa francesa eliminou os Leões de Faro?",
        ],
        [
            "Na Taça UEFA 1995-96, o Farense foi eliminado na 1.ª eliminatória pelo Olympique Lyonnais, de França.",
            "O Farense foi eliminado na 1.ª eliminatória da Taça UEFA 1995-96 pelo Olympique Lyonnais.",
        ],
        ["1.ª eliminatória", "Olympique Lyonnais"],
        test=[
            "Que equipa afastou o Farense da Taça UEFA 1995-96?",
            "o farense passou alguma eliminatoria na taca uefa?",
        ],
    ),
    fact(
        "resultados_lyon",
        [
            "Quais foram os resultados do Farense contra o Lyon?",
            "Quanto ficaram os jogos entre o Farense e o Olympique Lyonnais?",
            "resultado farense lyon taça uefa",
            "Por quanto perdeu o Farense com o Lyon no conjunto das duas mãos?",
            "Como acabou o jogo em casa do Farense com o Lyon?",
            "Qual foi o resultado da eliminatória Farense-Lyon?",
            "O Farense marcou algum golo ao Lyon?",
            "quanto perdeu o sc farense em frança",
        ],
        [
            "O Farense perdeu por 0-1 em casa e por 0-1 fora com o Olympique Lyonnais, 0-2 no conjunto das duas mãos.",
            "Contra o Olympique Lyonnais, o Farense perdeu 0-1 em casa e 0-1 fora, 0-2 no conjunto.",
        ],
        ["0-1", "0-2"],
        test=[
            "Por que resultados perdeu o Farense as duas mãos com o Olympique Lyonnais?",
            "o farense ganhou algum jogo ao lyon",
        ],
    ),
    # ---------------------------------------------------------- Taça de Portugal
    fact(
        "final_taca_1990",
        [
            "O Farense já jogou uma final da Taça de Portugal?",
            "Quando chegou o Farense à final da Taça de Portugal?",
            "Contra quem perdeu o Farense a final da Taça de Portugal?",
            "farense final da taça 1990",
            "Quem ganhou ao Farense na final da Taça de 1990?",
            "Em que ano foi o Sporting Clube Farense finalista da Taça?",
            "o farense chegou a final da taca de portugal?",
            "Os Leões de Faro já foram finalistas da Taça de Portugal?",
        ],
        [
            "O Farense foi finalista da Taça de Portugal em 1990 e perdeu a final contra o Estrela da Amadora.",
            "Em 1990, o Farense chegou à final da Taça de Portugal, mas perdeu contra o Estrela da Amadora.",
        ],
        ["1990", "Estrela da Amadora"],
        test=[
            "Quem foi o adversário do Farense na final da Taça de Portugal?",
            "Em que ano disputou o Farense a final da Taça de Portugal?",
        ],
    ),
    fact(
        # Derived: the Taça is not among the nine titles and the one final was lost.
        "nunca_ganhou_taca",
        [
            "O Farense já ganhou a Taça de Portugal?",
            "Quantas Taças de Portugal tem o Farense?",
            "farense ganhou a taça?",
            "O SC Farense tem alguma Taça de Portugal?",
            "Os Leões de Faro já venceram a Taça de Portugal?",
            "farense alguma vez levantou a taça de portugal",
            "O Farense conquistou a Taça de Portugal em 1990?",
        ],
        [
            "O Farense nunca ganhou a Taça de Portugal. Foi finalista em 1990, mas perdeu a final contra o Estrela da Amadora.",
        ],
        ["1990", "Estrela da Amadora"],
        test=[
            "A Taça de Portugal faz parte do palmarés do Farense?",
            "os leoes de faro ganharam a final da taca de 1990",
        ],
    ),
    # ------------------------------------------------------ Percurso no campeonato
    fact(
        "epocas_primeira_divisao",
        [
            "Em que épocas jogou o Farense na primeira divisão?",
            "Quando esteve o Farense na Primeira Liga?",
            "anos do farense na primeira divisao",
            "Em que anos jogou o SC Farense no escalão principal?",
            "O Farense jogou na primeira divisão nos anos 70?",
            "Quais foram as épocas dos Leões de Faro na primeira divisão?",
            "Quando é que o Farense andou na primeira liga?",
            "Em que períodos esteve o Sporting Clube Farense no primeiro escalão?",
        ],
        [
            "O Farense jogou na primeira divisão em 1970-1976, 1983-1985, 1986-1989 e 1990-2002, e voltou a subir em 2019-20 e em 2022-23.",
            "O Farense esteve na primeira divisão em 1970-1976, 1983-1985, 1986-1989 e 1990-2002. Depois, voltou a subir em 2019-20 e em 2022-23.",
        ],
        ["1970-1976", "1990-2002"],
        test=[
            "Podes listar as passagens do Farense pela primeira divisão?",
            "o farense andou na primeira liga nos anos 80?",
        ],
    ),
    fact(
        "numero_epocas_primeira",
        [
            "Quantas épocas jogou o Farense na primeira divisão?",
            "Quantas épocas tinha o Farense na Primeira Liga até 2013?",
            "quantos anos o farense esteve na primeira divisao",
            "Quantas presenças tinha o SC Farense no escalão principal até 2013?",
            "Quantas vezes participou o Farense no campeonato da primeira divisão até 2013?",
            "numero de epocas do farense na primeira liga",
            "Os Leões de Faro contavam quantas épocas na primeira divisão em 2013?",
        ],
        [
            "Até 2013, o Farense contava 23 épocas na primeira divisão.",
            "O Sporting Clube Farense contava 23 épocas na primeira divisão até 2013.",
        ],
        ["23 épocas", "2013"],
        test=[
            "Em 2013, quantas temporadas de primeira divisão somava o Farense?",
            "quantas epocas fez o farense no escalao principal ate 2013",
        ],
    ),
    fact(
        # Questions point at the 2002 relegation: the sheet dates only that one.
        "descida_2002",
        [
            "Em que época desceu o Farense da Primeira Liga no início dos anos 2000?",
            "Quando acabou a passagem do Farense pela Primeira Liga que começou em 1990?",
            "Quando é que o Farense desceu da primeira divisão antes de ir parar aos distritais?",
            "Em que época foi o SC Farense despromovido da Primeira Liga, depois de 1990?",
            "farense descida da primeira liga 2002",
            "Quando desceram os Leões de Faro da Primeira Liga nos anos 2000?",
            "Em que ano saiu o Farense da primeira divisão antes de voltar 18 anos depois?",
            "quando desceu o farense em 2002",
        ],
        [
            "O Farense desceu da Primeira Liga no fim da época 2001-02.",
            "Foi no fim da época 2001-02 que o Farense desceu da Primeira Liga.",
        ],
        ["2001-02"],
        test=[
            "Em que época terminou a passagem do Farense pela Primeira Liga antes do regresso de 2019-20?",
        ],
    ),
    fact(
        "sexto_escalao_2006",
        [
            "O Farense chegou a jogar nos distritais?",
            "Em que divisão estava o Farense em 2006?",
            "farense sexto escalao",
            "É verdade que o Farense caiu para a distrital?",
            "Onde jogava o SC Farense em 2006?",
            "Os Leões de Faro já estiveram na 2.ª divisão distrital?",
            "em que escalao andava o farense em 2006",
            "O Farense desceu até ao sexto escalão?",
        ],
        [
            "Em 2006, o Farense chegou a estar no sexto escalão, a 2.ª divisão distrital da AF Algarve.",
            "O Farense chegou a estar no sexto escalão em 2006, na 2.ª divisão distrital da AF Algarve.",
        ],
        ["2006", "sexto escalão"],
        test=[
            "Até que divisão caiu o Farense em 2006?",
            "o farense ja andou pelos campeonatos distritais do algarve?",
        ],
    ),
    fact(
        "duas_subidas_seguidas",
        [
            "Como saiu o Farense dos distritais?",
            "O que fez o Farense depois de cair para o sexto escalão?",
            "O Farense voltou a subir depois de 2006?",
            "quantas vezes seguidas subiu o farense depois de 2006",
            "O SC Farense recuperou depois de estar na distrital?",
            "Como foi a recuperação dos Leões de Faro depois de 2006?",
            "farense subidas seguidas como campeao",
            "O Farense subiu de divisão como campeão depois de 2006?",
        ],
        [
            "Depois de estar no sexto escalão em 2006, o Farense subiu duas vezes seguidas como campeão.",
            "O Farense subiu duas vezes seguidas como campeão, depois de chegar ao sexto escalão em 2006.",
        ],
        ["duas vezes seguidas", "campeão"],
        test=[
            "Como é que o Farense saiu do sexto escalão?",
            "Depois de 2006, o Farense subiu quantas divisões de seguida?",
        ],
    ),
    fact(
        "subida_segunda_liga",
        [
            "Quando subiu o Farense à Segunda Liga?",
            "Em que época chegou o Farense à Segunda Liga?",
            "farense segunda liga quando",
            "Quando é que os Leões de Faro subiram à Segunda Liga?",
            "O Farense subiu à Segunda Liga em que época?",
            "quando subiu o farense a 2.ª liga",
            "Em que época conseguiu o Sporting Clube Farense a subida à Segunda Liga?",
        ],
        [
            "O Farense subiu à Segunda Liga em 2012-13.",
            "Foi em 2012-13 que o Farense subiu à Segunda Liga.",
        ],
        ["2012-13", "Segunda Liga"],
        test=[
            "A subida do Farense à Segunda Liga aconteceu em que temporada?",
        ],
    ),
    fact(
        "epoca_2019_20",
        [
            "Como correu a época 2019-20 ao Farense?",
            "Em que lugar ficou o Farense na LigaPro em 2019-20?",
            "farense 2019/20",
            "O que aconteceu ao SC Farense na época interrompida pela pandemia?",
            "Em que posição terminou o Farense a época interrompida pela COVID-19?",
            "Como acabou a época 2019-2020 dos Leões de Faro?",
            "o farense subiu na epoca interrompida pelo covid?",
            "Qual foi a classificação do Farense na LigaPro na época 2019-20?",
        ],
        [
            "Em 2019-20, época interrompida pela pandemia de COVID-19, o Farense ficou em 2.º lugar na LigaPro e subiu à Primeira Liga.",
            "Na época 2019-20, interrompida pela pandemia de COVID-19, o Farense terminou em 2.º lugar na LigaPro e subiu à Primeira Liga.",
        ],
        ["2019-20", "2.º lugar", "LigaPro"],
        test=[
            "Como terminou o Farense a LigaPro de 2019-20?",
            "como ficou o farense quando o campeonato parou por causa da covid",
        ],
    ),
    fact(
        "regresso_primeira_18_anos",
        [
            "Depois de quantos anos voltou o Farense à Primeira Liga em 2020?",
            "Quantos anos esteve o Farense fora da Primeira Liga antes de 2019-20?",
            "Quando regressou o Farense à primeira divisão depois da descida de 2002?",
            "quantos anos o farense esteve fora da primeira liga ate 2020",
            "Em que época regressou o SC Farense à Primeira Liga após 2002?",
            "farense regresso primeira liga 18 anos",
            "Ao fim de quanto tempo voltaram os Leões de Faro à Primeira Liga em 2020?",
            "Quanto tempo passou entre a descida de 2002 e o regresso do Farense à Primeira Liga?",
        ],
        [
            "O Farense voltou à Primeira Liga em 2019-20, 18 anos depois, ao terminar em 2.º lugar na LigaPro.",
            "Em 2019-20, o Farense regressou à Primeira Liga 18 anos depois.",
        ],
        ["2019-20", "18 anos"],
        test=[
            "Em que época acabou a ausência do Farense da Primeira Liga que começou em 2002, e quantos anos durou?",
        ],
    ),
    fact(
        "treinador_2019_20",
        [
            "Quem era o treinador do Farense na subida de 2019-20?",
            "Quem treinava o Farense quando conseguiu a subida à Primeira Liga em 2019-20?",
            "treinador do farense na epoca 2019/20",
            "Quem foi o treinador que levou o SC Farense de volta à Primeira Liga após 18 anos?",
            "Quem orientava os Leões de Faro na época 2019-20, interrompida pela COVID-19?",
            "Sérgio Vieira treinou o Farense?",
            "quem era o mister do farense na subida de 2020",
            "Qual foi o treinador da subida do Farense em 2019-20?",
        ],
        [
            "O treinador do Farense na subida de 2019-20 foi Sérgio Vieira.",
            "Em 2019-20, o Farense voltou à Primeira Liga com o treinador Sérgio Vieira.",
        ],
        ["Sérgio Vieira"],
        test=[
            "Com que treinador subiu o Farense à Primeira Liga em 2019-20?",
            "quem treinava o farense quando a liga parou com a covid",
        ],
    ),
    fact(
        "subida_2022_23",
        [
            "O que aconteceu ao Farense em 2022-23?",
            "Em que lugar ficou o Farense na Liga Portugal 2 em 2022-23?",
            "O Farense subiu em 2023?",
            "farense 2022/23 subida",
            "Quando voltou o SC Farense a subir à Primeira Liga depois de 2020?",
            "Como correu a época 2022-2023 aos Leões de Faro?",
            "em que posicao acabou o farense a liga portugal 2 em 2023",
            "Qual foi a classificação do Farense na segunda liga em 2022-23?",
        ],
        [
            "Em 2022-23, o Farense terminou em 2.º lugar na Liga Portugal 2 e subiu de novo à Primeira Liga.",
            "Na época 2022-23, o Farense ficou em 2.º lugar na Liga Portugal 2 e voltou a subir à Primeira Liga.",
        ],
        ["2022-23", "2.º lugar", "Liga Portugal 2"],
        test=[
            "O Farense voltou a subir à Primeira Liga em 2022-23?",
            "como acabou o farense a liga portugal 2 de 2022/23",
        ],
    ),
    fact(
        "epoca_2023_24",
        [
            "Em que lugar ficou o Farense em 2023-24?",
            "Como correu a época 2023-24 ao Farense?",
            "classificação do farense 2023/24",
            "Em que posição terminou o SC Farense a Primeira Liga 2023-24?",
            "Quantas equipas havia na Primeira Liga quando o Farense ficou em 10.º?",
            "Os Leões de Faro ficaram a meio da tabela em 2023-24?",
            "o farense ficou em que lugar na liga 2023-2024",
            "Qual foi a classificação final do Farense na época 2023-24?",
        ],
        [
            "Na época 2023-24, o Farense terminou a Primeira Liga em 10.º lugar entre 18 equipas.",
            "Em 2023-24, o Farense ficou em 10.º lugar na Primeira Liga, entre 18 equipas.",
        ],
        ["10.º lugar", "18 equipas"],
        test=[
            "Em 2023-24, o Farense acabou em que lugar do campeonato?",
            "quantas equipas tinha a primeira liga em 2023-24 e onde ficou o farense",
        ],
    ),
    # ------------------------------------------------------------------- Títulos
    fact(
        "titulos_total",
        [
            "Quantos títulos tem o Farense?",
            "Que títulos ganhou o Farense?",
            "titulos do farense",
            "Quais são os títulos principais do Sporting Clube Farense?",
            "O Farense já ganhou alguma coisa?",
            "Quantos troféus tem o SC Farense?",
            "palmarés do farense",
            "Qual é o palmarés dos Leões de Faro?",
        ],
        [
            "O Farense tem nove títulos principais: o Campeonato da AF Algarve cinco vezes, a Segunda Divisão duas vezes, a Terceira Divisão uma vez e a 1.ª Divisão da AF Algarve uma vez.",
            "O Sporting Clube Farense tem nove títulos principais: o Campeonato da AF Algarve cinco vezes, a Segunda Divisão duas vezes, a Terceira Divisão uma vez e a 1.ª Divisão da AF Algarve uma vez.",
        ],
        ["nove títulos"],
        test=[
            "Quantos títulos principais conquistou o Farense?",
            "que trofeus ja ganharam os leoes de faro",
        ],
    ),
    fact(
        "titulos_campeonato_af_algarve",
        [
            "Quantas vezes foi o Farense campeão da AF Algarve?",
            "Quantos Campeonatos da AF Algarve ganhou o Farense?",
            "quantos campeonatos da af algarve tem o farense",
            "O SC Farense já venceu o Campeonato da Associação de Futebol do Algarve?",
            "Quantas vezes ganharam os Leões de Faro o Campeonato da AF Algarve?",
            "Qual é o título que o Farense ganhou mais vezes?",
            "campeonato af algarve farense quantas vezes",
        ],
        [
            "O Farense ganhou o Campeonato da AF Algarve cinco vezes.",
            "O Sporting Clube Farense venceu o Campeonato da AF Algarve cinco vezes.",
        ],
        ["Campeonato da AF Algarve", "cinco vezes"],
        test=[
            "O Farense ganhou o Campeonato da AF Algarve quantas vezes?",
            "o farense ganhou muitas vezes o campeonato do algarve?",
        ],
    ),
    fact(
        "titulos_segunda_divisao",
        [
            "Quantas vezes ganhou o Farense a Segunda Divisão?",
            "O Farense foi campeão da Segunda Divisão?",
            "segunda divisao farense titulos",
            "Quantos títulos da Segunda Divisão tem o SC Farense?",
            "Os Leões de Faro já venceram a Segunda Divisão?",
            "Quantas Segundas Divisões conquistou o Sporting Clube Farense?",
            "farense ganhou a 2.ª divisão quantas vezes",
        ],
        [
            "O Farense ganhou a Segunda Divisão duas vezes.",
            "O Sporting Clube Farense venceu a Segunda Divisão duas vezes.",
        ],
        ["Segunda Divisão", "duas vezes"],
        test=[
            "Em quantas ocasiões foi o Farense campeão da Segunda Divisão?",
        ],
    ),
    fact(
        "titulos_terceira_divisao",
        [
            "Quantas vezes ganhou o Farense a Terceira Divisão?",
            "O Farense já foi campeão da Terceira Divisão?",
            "terceira divisao farense",
            "Quantos títulos da Terceira Divisão tem o SC Farense?",
            "Os Leões de Faro ganharam a Terceira Divisão?",
            "O Sporting Clube Farense conquistou a 3.ª Divisão?",
            "farense campeao terceira divisao quantas vezes",
        ],
        [
            "O Farense ganhou a Terceira Divisão uma vez.",
            "O Sporting Clube Farense venceu a Terceira Divisão uma vez.",
        ],
        ["Terceira Divisão", "uma vez"],
        test=[
            "Quantos campeonatos da Terceira Divisão venceu o Farense?",
        ],
    ),
    fact(
        "titulos_1a_divisao_af_algarve",
        [
            "Quantas vezes ganhou o Farense a 1.ª Divisão da AF Algarve?",
            "O Farense venceu a 1.ª Divisão da AF Algarve?",
            "primeira divisao af algarve farense",
            "Quantos títulos da 1.ª Divisão da AF Algarve tem o SC Farense?",
            "Os Leões de Faro já ganharam a 1.ª Divisão da associação do Algarve?",
            "O Sporting Clube Farense conquistou a Primeira Divisão da AF Algarve?",
            "farense 1a divisao af algarve quantas vezes",
        ],
        [
            "O Farense ganhou a 1.ª Divisão da AF Algarve uma vez.",
            "O Sporting Clube Farense venceu a 1.ª Divisão da AF Algarve uma vez.",
        ],
        ["1.ª Divisão da AF Algarve", "uma vez"],
        test=[
            "O Farense tem títulos da 1.ª Divisão da AF Algarve?",
        ],
    ),
    # ------------------------------------------------------------------ Jogadores
    fact(
        "avancados_marroquinos",
        [
            "Que jogadores marroquinos se destacaram no Farense?",
            "Que avançados se destacaram no Farense nos anos 90?",
            "jogadores marroquinos do farense",
            "Que avançados marroquinos jogaram no SC Farense?",
            "Quem eram as estrelas do Farense nos anos 1990?",
            "O Farense teve jogadores de Marrocos?",
            "Que marroquinos marcaram a história dos Leões de Faro?",
            "avancados do farense anos 90",
        ],
        [
            "Nos anos 1990, destacaram-se no Farense os avançados marroquinos Hajry Redouane e Hassan Nader.",
            "Os avançados marroquinos Hajry Redouane e Hassan Nader destacaram-se no Farense nos anos 1990.",
        ],
        ["Hajry Redouane", "Hassan Nader"],
        test=[
            "Que dois marroquinos brilharam no ataque do Farense?",
            "quem eram os avancados de marrocos do farense",
        ],
    ),
    fact(
        "hajry_redouane",
        [
            "Quem foi Hajry Redouane?",
            "Hajry Redouane jogou no Farense?",
            "quem e hajry redouane",
            "Em que posição jogava Hajry Redouane no Farense?",
            "De que país era Hajry Redouane?",
            "Quando jogou Redouane no SC Farense?",
            "O que fez Hajry Redouane nos Leões de Faro?",
        ],
        [
            "Hajry Redouane foi um avançado marroquino que se destacou no Farense nos anos 1990.",
            "Hajry Redouane, avançado marroquino, destacou-se no Farense nos anos 1990.",
        ],
        ["Hajry Redouane", "avançado marroquino", "anos 1990"],
        test=[
            "Fala-me de Hajry Redouane.",
            "o redouane era avancado?",
        ],
    ),
    fact(
        "hassan_nader",
        [
            "Quem foi Hassan Nader?",
            "quem e hassan nader",
            "Hassan Nader jogou no Farense?",
            "Em que posição jogava Hassan Nader?",
            "De que país era Hassan Nader, do Farense?",
            "Hassan Nader foi importante para o Farense?",
            "O que fez Hassan Nader no SC Farense?",
        ],
        [
            "Hassan Nader foi um avançado marroquino que se destacou no Farense nos anos 1990.",
            "Hassan Nader, avançado marroquino, destacou-se no Farense nos anos 1990.",
        ],
        ["Hassan Nader", "avançado marroquino", "anos 1990"],
        test=[
            "Fala-me de Hassan Nader.",
            "hassan nader era de que nacionalidade",
        ],
    ),
    fact(
        "hassan_nader_periodos",
        [
            "Em que anos jogou Hassan Nader no Farense?",
            "Quando esteve Hassan Nader no Farense?",
            "hassan nader farense anos",
            "Quantas vezes passou Hassan Nader pelo SC Farense?",
            "Hassan Nader jogou no Farense até quando?",
            "Em que períodos representou Nader os Leões de Faro?",
            "quando jogou o nader no farense",
            "Hassan Nader voltou ao Farense?",
        ],
        [
            "Hassan Nader jogou no Farense em dois períodos: 1992-1995 e 1997-2004.",
            "Hassan Nader esteve no Farense em 1992-1995 e, depois, em 1997-2004.",
        ],
        ["1992-1995", "1997-2004"],
        test=[
            "Hassan Nader representou o Farense durante que anos?",
            "quando e que o nader vestiu a camisola do farense",
        ],
    ),
    fact(
        "peter_rufai",
        [
            "Quem foi Peter Rufai?",
            "Peter Rufai jogou no Farense?",
            "quando jogou peter rufai no farense",
            "Em que anos esteve Peter Rufai no SC Farense?",
            "Em que posição jogava Peter Rufai?",
            "Que guarda-redes nigeriano jogou no Farense?",
            "O Farense teve algum guarda-redes da Nigéria?",
            "guarda redes nigeriano do farense",
            "Os Leões de Faro tiveram um guarda-redes nigeriano?",
        ],
        [
            "Peter Rufai foi um guarda-redes nigeriano que jogou no Farense em 1994-1997.",
            "O guarda-redes nigeriano Peter Rufai jogou no Farense em 1994-1997.",
        ],
        ["Peter Rufai", "guarda-redes nigeriano", "1994-1997"],
        test=[
            "Fala-me de Peter Rufai, do Farense.",
            "De onde era o guarda-redes Peter Rufai?",
        ],
    ),
    fact(
        "bruno_alves",
        [
            "Bruno Alves jogou no Farense?",
            "Quando jogou Bruno Alves no Farense?",
            "bruno alves farense",
            "Em que época esteve Bruno Alves no SC Farense?",
            "O Bruno Alves passou pelos Leões de Faro?",
            "Em que anos representou Bruno Alves o Sporting Clube Farense?",
            "bruno alves jogou no farense em que ano",
        ],
        [
            "Bruno Alves jogou no Farense em 2002-2003.",
            "Bruno Alves passou pelo Farense em 2002-2003.",
        ],
        ["Bruno Alves", "2002-2003"],
        test=[
            "Bruno Alves chegou a vestir a camisola do Farense?",
            "quando e que o bruno alves jogou pelos leoes de faro",
        ],
    ),
    fact(
        "jogadores_conhecidos",
        [
            "Que jogadores conhecidos passaram pelo Farense?",
            "Quais foram os jogadores mais famosos do Farense?",
            "jogadores famosos do farense",
            "Diz-me alguns jogadores que jogaram no SC Farense.",
            "Que nomes importantes jogaram nos Leões de Faro?",
            "Quem jogou no Farense?",
            "Conheces jogadores históricos do Sporting Clube Farense?",
        ],
        [
            "Entre os jogadores que passaram pelo Farense estão os avançados marroquinos Hajry Redouane e Hassan Nader, o guarda-redes nigeriano Peter Rufai e Bruno Alves.",
        ],
        ["Hassan Nader", "Peter Rufai", "Bruno Alves"],
        test=[
            "Podes dizer-me nomes de jogadores que representaram o Farense?",
            "quais os craques que passaram pelo farense",
        ],
    ),
    # ------------------------------------- About the club, but not on the sheet
    unknown(
        "treinador_atual",
        [
            "Quem é o treinador do Farense?",
            "quem treina o farense agora",
            "Qual é o atual treinador do SC Farense?",
            "Quem é o mister do Farense esta época?",
            "Quem orienta a equipa do Sporting Clube Farense neste momento?",
            "treinador atual farense",
        ],
        test=[
            "Quem está a treinar o Farense hoje em dia?",
        ],
    ),
    unknown(
        "lotacao_estadio",
        [
            "Qual é a lotação do Estádio de São Luís?",
            "Quantos lugares tem o São Luís?",
            "quantas pessoas cabem no estadio do farense",
            "Qual a capacidade do Estádio de São Luís?",
            "Quantos espetadores leva o estádio do Farense?",
            "lotação do são luís",
        ],
        test=[
            "Quantos adeptos cabem no Estádio de São Luís?",
        ],
    ),
    unknown(
        "proximo_jogo",
        [
            "Quando é o próximo jogo do Farense?",
            "Contra quem joga o Farense este fim de semana?",
            "a que horas joga o farense",
            "Qual é o próximo adversário dos Leões de Faro?",
            "O Farense joga em casa no domingo?",
            "calendário do farense",
        ],
        test=[
            "quando joga o farense outra vez",
        ],
    ),
    unknown(
        "plantel_atual",
        [
            "Qual é o plantel atual do Farense?",
            "Quem são os jogadores do Farense esta época?",
            "Quem é o capitão do Farense?",
            "quem joga a ponta de lança no farense agora",
            "Quais são os reforços do SC Farense?",
            "Quem é o guarda-redes titular do Farense?",
        ],
    ),
    unknown(
        "presidente",
        [
            "Quem é o presidente do Farense?",
            "quem manda no farense",
            "Quem preside ao Sporting Clube Farense?",
            "Quem é o presidente da direção do SC Farense?",
            "Quem foi o primeiro presidente do Farense?",
            "presidente dos leoes de faro",
        ],
        test=[
            "Como se chama o presidente do SC Farense?",
        ],
    ),
    unknown(
        "classificacao_atual",
        [
            "Em que lugar está o Farense na tabela?",
            "Como está o Farense no campeonato esta época?",
            "classificação atual do farense",
            "Quantos pontos tem o Farense?",
            "O SC Farense está em zona de descida?",
            "Como vai o Farense este ano?",
        ],
        test=[
            "Em que posição vai o Farense neste campeonato?",
        ],
    ),
    unknown(
        "bilhetes_socios",
        [
            "Quanto custa um bilhete para ver o Farense?",
            "Como me faço sócio do Farense?",
            "Quantos sócios tem o Sporting Clube Farense?",
            "onde compro bilhetes para o jogo do farense",
            "Quanto custam as quotas do SC Farense?",
            "Há bilhetes para o próximo jogo dos Leões de Faro?",
        ],
    ),
    unknown(
        "recordes",
        [
            "Quem é o melhor marcador da história do Farense?",
            "Qual foi a maior vitória do Farense?",
            "Quem fez mais jogos pelo SC Farense?",
            "Qual é o recorde de público no Estádio de São Luís?",
            "quem marcou mais golos pelo farense",
            "Qual foi a pior derrota do Sporting Clube Farense?",
        ],
        test=[
            "Qual foi o jogo com mais golos da história do Farense?",
        ],
    ),
    # ----------------------------------------------------------- Off-topic questions
    decline(
        "tempo",
        [
            "Como vai estar o tempo em Faro amanhã?",
            "Vai chover este fim de semana?",
            "qual a temperatura em lisboa hoje",
            "Está calor no Algarve?",
            "Preciso de levar guarda-chuva amanhã?",
            "previsão do tempo para o porto",
        ],
        test=[
            "Vai fazer sol em Faro no domingo?",
        ],
    ),
    decline(
        "receitas",
        [
            "Como se faz bacalhau à Brás?",
            "Dá-me uma receita de arroz de marisco.",
            "receita de cataplana algarvia",
            "Quanto tempo demora a cozer um ovo?",
            "como faço pastéis de nata",
            "O que posso fazer para o jantar?",
        ],
        test=[
            "Como se prepara um polvo à lagareiro?",
        ],
    ),
    decline(
        "outros_clubes",
        [
            "Quem ganhou o Benfica-Porto?",
            "Quanto ficou o jogo do Sporting ontem?",
            "O Porto ganhou ao Braga?",
            "resultado do benfica",
            "Quem é o treinador do Benfica?",
            "Quantos campeonatos tem o Sporting Clube de Portugal?",
            "Como ficou o Portimonense no fim de semana?",
        ],
        test=[
            "Como está o Olhanense este ano?",
        ],
    ),
    decline(
        "futebol_internacional",
        [
            "Quem ganhou a Liga dos Campeões?",
            "Quem é o melhor jogador do mundo?",
            "Quantos golos tem o Cristiano Ronaldo?",
            "quem ganhou o ultimo mundial",
            "Quando começa o próximo Europeu de futebol?",
            "Qual é o clube com mais títulos em Espanha?",
        ],
    ),
    decline(
        "politica",
        [
            "Quem é o primeiro-ministro de Portugal?",
            "Em quem devo votar nas próximas eleições?",
            "O que achas do governo?",
            "quem ganhou as eleicoes legislativas",
            "Qual é o melhor partido político?",
            "Quem é o presidente da Câmara de Faro?",
        ],
        test=[
            "Quem é o Presidente da República?",
        ],
    ),
    decline(
        "matematica",
        [
            "Quanto é 17 vezes 23?",
            "Resolve esta equação: 2x + 5 = 15",
            "Ajudas-me com os trabalhos de casa de matemática?",
            "qual é a raiz quadrada de 144",
            "Quanto é 15% de 200?",
            "Como se calcula a área de um círculo?",
        ],
        test=[
            "quanto e 8 mais 35",
        ],
    ),
    decline(
        "cultura_geral",
        [
            "Qual é a capital de França?",
            "Quem escreveu Os Lusíadas?",
            "Quantos habitantes tem Portugal?",
            "quando foi o 25 de abril",
            "Qual é o rio mais comprido do mundo?",
            "Quem pintou a Mona Lisa?",
        ],
    ),
    decline(
        "turismo",
        [
            "Que praias me recomendas em Faro?",
            "Onde posso comer bem em Faro?",
            "Quais são os melhores hotéis no Algarve?",
            "como vou de lisboa para faro",
            "O que posso visitar no Algarve num fim de semana?",
            "A que horas abre o aeroporto de Faro?",
        ],
        test=[
            "Que monumentos devo ver em Faro?",
        ],
    ),
    decline(
        "tecnologia",
        [
            "Escreve-me um programa em Python.",
            "Como instalo o Windows no meu computador?",
            "O que é a inteligência artificial?",
            "o meu telemovel nao liga, o que faço",
            "Qual é o melhor portátil para comprar?",
            "Como crio uma conta de email?",
        ],
    ),
    decline(
        "saude_e_conversa",
        [
            "Tenho dores de cabeça, o que devo tomar?",
            "Conta-me uma anedota.",
            "Escreve um poema sobre o mar.",
            "Qual é o sentido da vida?",
            "dá-me conselhos para dormir melhor",
            "Como estás hoje?",
        ],
    ),
]


# ----------------------------------------------------------------- helpers
def norm_question(text: str) -> str:
    """Key used to compare questions: lowercased, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().lower()


def fold(text: str) -> str:
    """Lowercase without accents; the fact-recall metric compares this way."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def loose_key(text: str) -> str:
    """Stricter key for 'is this the same question?': folded, punctuation dropped,
    whitespace collapsed, so a variant that only changes case, accents or
    punctuation counts as the same question."""
    return " ".join(re.sub(r"[^\w]+", " ", fold(text)).split())


def check_facts(facts: list[Fact]) -> None:
    ids = [f.id for f in facts]
    assert len(ids) == len(set(ids)), "duplicate fact id"
    owner: dict[str, str] = {}
    for f in facts:
        assert f.kind in {"fact", "unknown", "decline"}, (f.id, f.kind)
        assert len(f.questions) >= MIN_QUESTIONS, (
            f"{f.id}: {len(f.questions)} questions, need at least {MIN_QUESTIONS}"
        )
        assert 1 <= len(f.answers) <= 2, f"{f.id}: use one or two answer phrasings"
        assert 1 <= len(f.keywords) <= 3, f"{f.id}: use one to three keywords"
        # Across all items and all three splits: a test phrasing must be new, not a
        # train/val question with other case, accents or punctuation.
        for q in f.questions + f.test:
            key = loose_key(q)
            assert key not in owner, f"question {q!r} appears in {owner.get(key)} and {f.id} (folded: {key!r})"
            owner[key] = f.id
        for a in f.answers:
            words = len(a.split())
            assert words <= MAX_ANSWER_WORDS, f"{f.id}: answer has {words} words: {a!r}"
            for k in f.keywords:
                assert k.lower() in a.lower(), f"{f.id}: keyword {k!r} missing from {a!r}"
                assert fold(k) in fold(a), f"{f.id}: keyword {k!r} missing (folded) from {a!r}"
        if f.kind == "decline":
            assert f.answers == (DECLINE,) and "só posso responder a perguntas sobre o Sporting Clube Farense" in DECLINE
        if f.kind == "unknown":
            assert f.answers == (UNKNOWN,) and "não tenho essa informação" in UNKNOWN


def expand(facts: list[Fact]) -> list[tuple[Fact, str, str]]:
    """All (fact, question, answer) triples, without duplicate (question, answer) pairs."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for f in facts:
        for q in f.questions:
            for a in f.answers:
                pair = (norm_question(q), a)
                if pair not in seen:
                    seen.add(pair)
                    rows.append((f, q, a))
    return rows


def pick_val_questions(facts: list[Fact], rng: random.Random) -> set[str]:
    """Hold out one question per fact, in random fact order, until each kind
    (fact / unknown / decline) has about VAL_FRACTION of its examples held out."""
    val: set[str] = set()
    for kind in ("fact", "unknown", "decline"):
        group = [f for f in facts if f.kind == kind]
        target = round(VAL_FRACTION * sum(len(f.questions) * len(f.answers) for f in group))
        rng.shuffle(group)
        held = 0
        for f in group:
            if held >= target:
                break
            val.add(norm_question(rng.choice(f.questions)))
            held += len(f.answers)
    return val


def build_test(facts: list[Fact], rng: random.Random) -> list[tuple[Fact, str, str]]:
    """One row per test phrasing, with one of its item's fixed answers, shuffled."""
    rows = [(f, q, rng.choice(f.answers)) for f in facts for q in f.test]
    rng.shuffle(rows)
    return rows


def record(question: str, answer: str, keywords: tuple[str, ...]) -> str:
    return json.dumps(
        {"question": question, "answer": answer, "keywords": list(keywords)},
        ensure_ascii=False,
    )


def write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so a failed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(out_dir: Path = OUT_DIR) -> None:
    check_facts(FACTS)
    rng = random.Random(SEED)

    rows = expand(FACTS)
    rng.shuffle(rows)
    val_questions = pick_val_questions(FACTS, rng)
    train = [r for r in rows if norm_question(r[1]) not in val_questions]
    val = [r for r in rows if norm_question(r[1]) in val_questions]

    # (a) every fact asked in val is also taught in train, in other words
    train_q = {norm_question(q) for _, q, _ in train}
    for f in {r[0].id: r[0] for r in val}.values():
        in_train = [q for q in f.questions if norm_question(q) in train_q]
        assert len(in_train) >= MIN_QUESTIONS - 1, f"{f.id}: only {len(in_train)} train phrasings"
    # (b) sizes
    total = len(rows)
    assert total >= MIN_TOTAL, f"{total} examples, need at least {MIN_TOTAL}"
    assert len(val) >= MIN_VAL, f"{len(val)} validation examples, need at least {MIN_VAL}"
    assert 0.08 <= len(val) / total <= 0.12, f"val fraction {len(val) / total:.3f}"
    assert len(train) + len(val) == total

    # Test split: built after train/val from its own stream, so it cannot move them.
    test = build_test(FACTS, random.Random(TEST_SEED))
    splits = {"train": train, "val": val, "test": test}
    # (c) no question in two splits, even after folding case, accents and punctuation
    keys = {name: {loose_key(q) for _, q, _ in rows} for name, rows in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = keys[a] & keys[b]
        assert not shared, f"questions in both {a} and {b}: {sorted(shared)[:3]}"
    # (d) every fact item taught in train is asked in test, in new words
    train_ids = {f.id for f, _, _ in train}
    test_ids = {f.id for f, _, _ in test}
    missing = [f.id for f in FACTS if f.kind == "fact" and f.id in train_ids and f.id not in test_ids]
    assert not missing, f"fact items with no test phrasing: {missing}"
    # (e) test asks only facts taught in train: each keyword is in some train answer of the item
    train_answers: dict[str, list[str]] = {}
    for f, _, a in train:
        train_answers.setdefault(f.id, []).append(fold(a))
    for f in {r[0].id: r[0] for r in test}.values():
        for k in f.keywords:
            assert any(fold(k) in a for a in train_answers.get(f.id, [])), f"{f.id}: keyword {k!r} in no train answer"
    assert MIN_TEST <= len(test) <= MAX_TEST, f"{len(test)} test examples, want {MIN_TEST}-{MAX_TEST}"

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        lines = [record(q, a, f.keywords) for f, q, a in split]
        write_atomic(out_dir / f"{name}.jsonl", "\n".join(lines) + "\n")

    kinds = {k: sum(f.kind == k for f in FACTS) for k in ("fact", "unknown", "decline")}
    print(
        f"train={len(train)} val={len(val)} test={len(test)} "
        f"facts={kinds['fact']} unknown={kinds['unknown']} decline={kinds['decline']} "
        f"val_items={len({r[0].id for r in val})} test_items={len(test_ids)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build train.jsonl, val.jsonl and test.jsonl.")
    parser.add_argument("out_dir", nargs="?", type=Path, default=OUT_DIR,
                        help="folder to write the three files into (default: this script's folder)")
    main(parser.parse_args().out_dir)
