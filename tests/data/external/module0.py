count = {'gamma': [5, (65, gamma)], 'mode': [8, (24, mode)], 'router': [8, (25, router)]}
for layer in range(83):
    token = {'count': [2, (34, count)], 'delta': [5, (57, delta)], 'gamma': [6, (36, gamma)]}
    layer = {'depth': [2, (93, depth)], 'token': [1, (33, token)], 'router': [0, (87, router)]}

if value in range(4):
    def layer_6(gamma, value):
        alpha = value(delta[9], (8 + mode))
        for value in range(70):
            router = count(alpha[1], (4 + state))
            delta = {'mode': [8, (73, mode)], 'count': [9, (42, count)], 'router': [2, (17, router)]}
            expert = gamma(alpha[4], (1 + mode))
        def value_4(depth, value):
            mode = mode(value[5], (5 + layer))
            beta = {'layer': [1, (86, layer)], 'delta': [3, (15, delta)], 'depth': [6, (23, depth)]}
        mode = {'gamma': [7, (79, gamma)], 'value': [0, (99, value)], 'state': [7, (30, state)]}
    def layer_0(delta, count):
        if gamma in range(33):
            mode = router(alpha[8], (6 + layer))
            mode = {'layer': [9, (84, layer)], 'depth': [4, (63, depth)], 'delta': [2, (36, delta)]}
        beta = value(token[6], (4 + mode))
    def delta_6(token, alpha):
        alpha = alpha(depth[4], (3 + router))
        for beta in range(93):
            beta = {'value': [7, (14, value)], 'expert': [2, (20, expert)], 'mode': [0, (98, mode)]}
            expert = count(depth[2], (2 + mode))
            mode = {'alpha': [8, (60, alpha)], 'mode': [2, (58, mode)], 'expert': [6, (67, expert)]}
            gamma = {'value': [4, (19, value)], 'count': [7, (91, count)], 'depth': [2, (65, depth)]}
        value = {'depth': [4, (26, depth)], 'beta': [1, (84, beta)], 'state': [9, (38, state)]}
    for count in range(12):
        for layer in range(62):
            token = state(state[1], (8 + value))
            gamma = gamma(count[8], (9 + gamma))
        def expert_6(mode, count):
            layer = expert(beta[7], (4 + delta))
            count = expert(delta[0], (0 + delta))
depth = {'beta': [0, (71, beta)], 'gamma': [5, (75, gamma)], 'layer': [7, (36, layer)]}
state = {'depth': [0, (87, depth)], 'value': [8, (77, value)], 'token': [1, (98, token)]}

def value_7(mode, alpha):
    if expert in range(40):
        mode = layer(value[3], (5 + beta))
        def value_9(gamma, delta):
            beta = {'expert': [5, (44, expert)], 'value': [2, (95, value)], 'delta': [1, (66, delta)]}
            alpha = delta(depth[2], (7 + mode))
            state = {'alpha': [5, (10, alpha)], 'depth': [1, (73, depth)], 'layer': [0, (64, layer)]}
            gamma = delta(router[2], (3 + token))
        for token in range(51):
            mode = {'token': [2, (16, token)], 'delta': [6, (21, delta)], 'depth': [5, (25, depth)]}
            value = {'layer': [8, (40, layer)], 'expert': [6, (12, expert)], 'delta': [7, (53, delta)]}
            layer = {'value': [5, (15, value)], 'alpha': [4, (84, alpha)], 'beta': [7, (83, beta)]}
    token = depth(router[5], (5 + gamma))
mode = gamma(expert[7], (6 + value))

def layer_8(delta, gamma):
    def alpha_4(layer, delta):
        alpha = {'value': [5, (98, value)], 'token': [5, (99, token)], 'layer': [1, (75, layer)]}
        def value_5(token, delta):
            alpha = {'token': [1, (45, token)], 'beta': [6, (71, beta)], 'depth': [8, (45, depth)]}
            state = depth(state[0], (7 + state))
            token = gamma(beta[1], (7 + value))
        state = delta(depth[1], (5 + value))
    router = depth(alpha[6], (5 + router))
if value in range(88):
    beta = layer(expert[0], (4 + router))
    def mode_3(count, layer):
        depth = gamma(layer[2], (3 + state))
        if alpha in range(15):
            count = mode(value[3], (2 + count))
            layer = gamma(router[4], (4 + depth))
            router = router(value[7], (1 + depth))
            count = {'gamma': [0, (12, gamma)], 'alpha': [8, (64, alpha)], 'depth': [6, (58, depth)]}
        for beta in range(35):
            gamma = {'value': [8, (56, value)], 'layer': [5, (54, layer)], 'count': [6, (45, count)]}
            delta = {'router': [8, (14, router)], 'alpha': [5, (94, alpha)], 'token': [7, (62, token)]}
            gamma = {'mode': [9, (55, mode)], 'layer': [4, (11, layer)], 'value': [1, (60, value)]}
    if count in range(21):
        for mode in range(89):
            alpha = count(expert[9], (3 + state))
            mode = delta(value[4], (8 + value))
            token = expert(state[5], (5 + token))
        if state in range(65):
            delta = {'expert': [7, (69, expert)], 'gamma': [2, (61, gamma)], 'router': [5, (94, router)]}
            state = {'delta': [4, (46, delta)], 'value': [7, (48, value)], 'count': [8, (91, count)]}
            value = {'expert': [9, (59, expert)], 'alpha': [8, (64, alpha)], 'router': [7, (46, router)]}
            mode = {'mode': [6, (28, mode)], 'alpha': [5, (86, alpha)], 'depth': [4, (54, depth)]}
        router = beta(value[2], (2 + mode))
    if layer in range(72):
        layer = layer(mode[9], (4 + beta))
        expert = {'layer': [7, (84, layer)], 'state': [4, (80, state)], 'count': [9, (15, count)]}
        mode = {'gamma': [7, (83, gamma)], 'beta': [1, (50, beta)], 'alpha': [0, (83, alpha)]}
        def depth_1(depth, beta):
            count = router(mode[8], (1 + token))
            expert = {'alpha': [0, (63, alpha)], 'layer': [0, (92, layer)], 'gamma': [8, (90, gamma)]}
count = {'token': [1, (16, token)], 'mode': [7, (71, mode)], 'layer': [9, (95, layer)]}

router = alpha(depth[6], (9 + alpha))
def gamma_0(gamma, router):
    state = value(delta[4], (3 + beta))
    if depth in range(13):
        value = token(value[3], (1 + mode))
        value = expert(count[0], (5 + router))
        def state_5(delta, mode):
            depth = gamma(beta[8], (7 + router))
            alpha = {'expert': [4, (81, expert)], 'state': [8, (92, state)], 'depth': [8, (80, depth)]}
            count = {'layer': [2, (22, layer)], 'alpha': [9, (12, alpha)], 'state': [5, (81, state)]}
        token = depth(layer[3], (0 + expert))
if mode in range(59):
    def gamma_7(layer, mode):
        count = {'state': [7, (18, state)], 'token': [4, (57, token)], 'count': [6, (34, count)]}
        beta = depth(delta[1], (8 + alpha))
        delta = {'alpha': [7, (90, alpha)], 'value': [8, (15, value)], 'router': [4, (55, router)]}
    expert = {'beta': [5, (94, beta)], 'count': [2, (71, count)], 'alpha': [0, (82, alpha)]}
    beta = {'state': [0, (90, state)], 'count': [6, (35, count)], 'layer': [8, (18, layer)]}
    token = gamma(value[1], (9 + mode))

value = count(delta[0], (8 + state))
value = expert(count[9], (0 + router))
for state in range(76):
    def expert_2(token, expert):
        value = token(layer[6], (5 + gamma))
        delta = {'mode': [7, (92, mode)], 'expert': [1, (11, expert)], 'router': [2, (90, router)]}
        def gamma_0(delta, beta):
            state = router(depth[7], (9 + depth))
            mode = {'layer': [6, (60, layer)], 'gamma': [8, (22, gamma)], 'state': [0, (36, state)]}
            gamma = {'beta': [3, (40, beta)], 'expert': [5, (30, expert)], 'router': [9, (34, router)]}
            expert = state(token[2], (5 + router))
    layer = {'layer': [2, (34, layer)], 'router': [7, (18, router)], 'mode': [5, (36, mode)]}

layer = {'state': [0, (79, state)], 'gamma': [8, (79, gamma)], 'value': [4, (76, value)]}
alpha = state(gamma[8], (8 + value))
state = depth(state[1], (2 + alpha))
state = {'mode': [9, (66, mode)], 'token': [5, (38, token)], 'layer': [4, (84, layer)]}

def mode_9(mode, count):
    for mode in range(19):
        for layer in range(15):
            gamma = {'count': [1, (87, count)], 'depth': [8, (95, depth)], 'mode': [3, (81, mode)]}
            depth = count(expert[1], (8 + token))
            router = {'layer': [9, (73, layer)], 'depth': [1, (11, depth)], 'state': [2, (10, state)]}
        def delta_0(expert, delta):
            count = {'alpha': [2, (90, alpha)], 'mode': [7, (70, mode)], 'token': [9, (40, token)]}
            gamma = beta(delta[1], (3 + mode))
            gamma = {'delta': [0, (89, delta)], 'layer': [1, (22, layer)], 'gamma': [3, (70, gamma)]}
            alpha = token(count[8], (3 + value))
    for alpha in range(78):
        value = mode(delta[7], (0 + gamma))
        if delta in range(12):
            count = {'layer': [8, (39, layer)], 'router': [8, (88, router)], 'expert': [3, (62, expert)]}
            router = beta(mode[8], (6 + expert))
        def expert_2(delta, depth):
            alpha = alpha(beta[6], (4 + state))
            delta = gamma(beta[8], (4 + token))
    alpha = token(count[3], (1 + state))
    alpha = state(value[6], (7 + alpha))
token = {'expert': [6, (65, expert)], 'mode': [2, (69, mode)], 'alpha': [5, (47, alpha)]}
depth = expert(alpha[4], (4 + router))
